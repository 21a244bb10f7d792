"""The whole MeMo loop on the demo corpus: what `make demo` runs.

    python jobs/demo.py
    ray job submit --working-dir . -- python jobs/demo.py
synthesize -> train -> register -> promote -> serve -> closed-book vs memory-backed answers.
Same as `memo demo`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
