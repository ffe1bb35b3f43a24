"""Main job.

Locally: `python jobs/train.py`; on a cluster: `ray job submit -- python jobs/train.py`.

All logic lives in mmdls_dist.cli (`mmdls train --help` lists the options).
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the repository is the job's cwd but not always
# importable (jobs/ is sys.path[0]); make it so without requiring a pip install on the node.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdls_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
