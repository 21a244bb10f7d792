"""Evaluate MeMo against closed-book, BM25 RAG and oracle readers on a benchmark sample.

    python jobs/evaluate.py --benchmark musique --data musique_ans_dev.jsonl --limit 20 \
        --methods closed_book,bm25,oracle,memo_single,memo_structured,memo_gold_decomp --out eval/musique
    ray job submit --working-dir . -- python jobs/evaluate.py --benchmark narrativeqa --data nqa.jsonl \
        --memory models:/memo-nqa@champion --executive-url https://api.example.com/v1 --executive-model gpt-x \
        --out eval/nqa

Every method reads with the same executive. Without --memory the memory for the benchmark's corpus is
synthesized, trained and registered first. Writes OUT/results.json, results.md, results.png,
predictions.jsonl and traces/<method>.jsonl, and logs them to the MLflow experiment `memo-eval`;
a re-run with the same settings resumes. Protocol budgets and temperatures: --pinning-turns 4 ...
(fields of memo.config.ExecutiveConfig); a memory built here takes the train. and synthesize. sections:
--set train.epochs=3 --synthesize.chunk-words 200.
Same as `memo eval ...`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
