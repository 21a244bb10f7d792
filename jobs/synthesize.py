"""Synthesize reflections (question/answer pairs) from a domain's documents with Ray Data.

    python jobs/synthesize.py --domain demo --corpus examples/demo/corpus.jsonl
    ray job submit --working-dir . -- python jobs/synthesize.py --domain demo \
        --corpus examples/demo/corpus.jsonl --out /mnt/memo/reflections/demo
    python jobs/synthesize.py --domain demo --corpus C --generator http --base-url https://host/v1 --model M
Writes OUT/reflections.parquet, OUT/rejects.parquet, OUT/chunks.parquet and OUT/stats.json (without --out:
MEMO_HOME/reflections/<domain>/<resume key>); a re-run with the same corpus and config does nothing, and
an --out holding reflections made otherwise is refused. Same as `memo synthesize ...`; `--help` lists
every field.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
