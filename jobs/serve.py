"""Run the OpenAI-compatible memory router (Ray Serve) on 127.0.0.1:8000 in the foreground.

    python jobs/serve.py --domains demo
    serve run serve_configs/demo.yaml                  # the same app from a Serve config file
    ray job submit --working-dir . -- python jobs/serve.py --domains demo   # keeps the job running
Same as `memo serve ...`.
"""

import sys

from memo.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
