"""Merge registered memories into one (TIES, DARE, task arithmetic, linear) and register the result as a
new version with alias `candidate`; promotion to champion goes through `memo promote`'s gate.

Local:
    python jobs/merge.py --domain hr-legal --from models:/memo-hr@champion models:/memo-legal/3 --method ties
On a Ray cluster (the merge runs in the job's driver, one tensor at a time: about one memory's size in RAM):
    ray job submit --working-dir . -- python jobs/merge.py --domain hr-legal \
        --from models:/memo-hr@champion models:/memo-legal@champion --method ties --density 0.3
Same as `memo merge ...`; every flag is listed by `python jobs/merge.py --help`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
