"""The platform team's job: synthesize reflections from a corpus, train the domain's memory model,
register it in MLflow as a new version with alias `candidate`.

Local (starts its own Ray instance):
    python jobs/train.py --domain demo --corpus examples/demo/corpus.jsonl
On a Ray cluster (see README "Running on a Ray cluster"; the client needs RAY_AUTH_MODE=token):
    ray job submit --working-dir . -- python jobs/train.py --domain demo --corpus examples/demo/corpus.jsonl
From reflections already synthesized, on 2 workers, a few epochs (tiny CPU smoke run):
    python jobs/train.py --domain demo --reflections .memo/reflections/demo/<resume key> --workers 2 --epochs 1
With an LLM generator, a recipe, or synthesis settings of their own (the `synthesize.` section):
    python jobs/train.py --domain demo --corpus C --synthesize.generator http --synthesize.base-url U \
        --synthesize.model M --synthesize.chunk-words 200
    python jobs/train.py --domain demo --corpus C --config configs/paper.yaml
Continual update of the champion on new reflections (plus a replay share of earlier ones), as LoRA:
    ray job submit --working-dir . -- python jobs/train.py --domain demo --from champion \
        --reflections /shared/reflections/demo-new --finetune lora
GPU cluster, effective batch 256 over 8 workers:
    ray job submit --working-dir . -- python jobs/train.py --domain demo --corpus /shared/corpus \
        --device cuda --workers 8 --set effective_batch_size=256 --set recipe=paper
Same as `memo train ...`; every flag is listed by `python jobs/train.py --help`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
