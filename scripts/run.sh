#!/usr/bin/env bash
# README command 1: set up (once) and run the main job. With no arguments it runs the
# embedded default: synthetic cohort -> shards -> local Ray. Arguments go to jobs/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python jobs/train.py "$@"
