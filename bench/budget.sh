#!/usr/bin/env bash
# Issue 27's budget proof on an idle machine: the demo's wall time, then `run --recipe best --budget 10m`
# on the same table and cache (rates measured by the demo), then each step kind's estimate against its time.
#   bash bench/budget.sh WORKDIR
set -euo pipefail
W=${1:-/tmp/hexpress-budget}
mkdir -p "$W"
start=$(date +%s)
python cli.py demo --work-dir "$W/demo"
echo "demo wall: $(( $(date +%s) - start )) s"
start=$(date +%s)
python cli.py run --data "$W/demo/her2st.csv" --recipe best --budget 10m \
  --cache-dir "$W/demo/cache" --out "$W/best-10m"
echo "best --budget 10m wall: $(( $(date +%s) - start )) s"
python bench/runner.py "$W/best-10m"
