"""Move a registry alias of a domain's memory model (default: candidate -> champion).

    python jobs/promote.py --domain demo --to champion
    ray job submit --working-dir . -- python jobs/promote.py --domain demo --to champion
Deployments follow the alias: the router sends new requests to the new version within
`alias_refresh_s` seconds. Same as `memo promote ...`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
