"""Synthesize reflections (question/answer pairs) from a domain's documents with Ray Data.

    python jobs/synthesize.py --domain demo --corpus examples/demo/corpus.jsonl --out .memo/reflections/demo
    ray job submit --working-dir . -- python jobs/synthesize.py --domain demo \
        --corpus examples/demo/corpus.jsonl --out /mnt/memo/reflections/demo
Writes OUT/reflections.parquet, OUT/rejects.parquet, OUT/chunks.parquet and OUT/stats.json; a re-run
with the same corpus and config does nothing. Same as `memo synthesize ...`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
