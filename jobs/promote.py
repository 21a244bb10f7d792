"""Promote a domain's memory version through the gate (default: candidate -> champion).

    python jobs/promote.py --domain demo --to champion [--qa held_out.jsonl] [--margin 0.05] [--force]
    ray job submit --working-dir . -- python jobs/promote.py --domain demo --to champion

The candidate and the current champion answer the same held-out questions (the paraphrases each
version kept out of training, plus any --qa files); a candidate worse by more than --margin is
refused with exit code 3 unless --force (logged in MLflow and the alias audit trail). Deployments
follow the alias: the router sends new requests to the new version within `alias_refresh_s`
seconds. Same as `memo promote ...`; `memo rollback --domain D` undoes the last move.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
