#!/usr/bin/env bash
# Create .venv (once) and install mmdls-dist with its dev extra. Safe to re-run: it only
# reinstalls when pyproject.toml changed. Needs nothing but Python >= 3.10 with venv.
#
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, a CPU build
#                here). On a GPU machine set e.g. TORCH_SPEC="torch==2.13.0" with your
#                CUDA index, or pre-install torch in .venv and set TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=.venv/.mmdls-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned: a bare "torch" requirement on a machine without torch would
  # resolve to a multi-GB CUDA build.
  if [ "${TORCH_SPEC:-}" != "skip" ]; then
    .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
