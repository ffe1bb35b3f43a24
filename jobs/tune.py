"""`mmdls tune` as a job: `ray job submit -- python jobs/tune.py --sweep ... --config ...`."""

import sys
from pathlib import Path

# Importable under `ray job submit --working-dir .` without a pip install (see train.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdls_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
