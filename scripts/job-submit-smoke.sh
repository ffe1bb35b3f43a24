#!/usr/bin/env bash
# The cluster path, end to end on this machine: start a Ray head, submit the training job
# with `ray job submit --working-dir .` (what a cluster user runs), wait for it, stop Ray.
#   bash scripts/job-submit-smoke.sh [extra jobs/train.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
out=$(mktemp -d)
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --num-cpus 2 --dashboard-host 127.0.0.1 >/dev/null
# Ray 2.60 clusters require token auth; the head wrote the token to ~/.ray/auth_token and
# the job client reads it when told the mode.
RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
  ray job submit --working-dir . -- python jobs/train.py --config debug \
  --workdir "$out/work" --set run.storage_path="$out/runs" --set optim.epochs=2 \
  --set synth.patients=60 "$@"
echo "job outputs: $out"
