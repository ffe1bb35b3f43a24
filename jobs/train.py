"""Main job.

Locally: `python jobs/train.py`; on a cluster: `ray job submit -- python jobs/train.py`.

All logic lives in mmdls_dist.cli (`mmdls train --help` lists the options).
"""

import sys

from mmdls_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
