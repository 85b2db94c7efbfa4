#!/usr/bin/env bash
# Regenerate the README's results table: each CPU preset (and the notebook) over seeds 0-2,
# one fresh `fmnist train` process per seed, the machine otherwise idle.
#
#   bash benchmarks/accuracy.sh                  # about 3 min (fast) + 3 min (notebook) + 3 x 20 min (best-cpu) on 2 cores
#   MODELS="fast" bash benchmarks/accuracy.sh    # one preset
#
# Runs land in $OUT (default results/), reused if a rerun finds them finished; the table
# is printed and kept in $OUT/table.md, the numbers in $OUT/results.json. `best` needs a
# GPU: benchmarks/gpu_check.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
.venv/bin/python benchmarks/accuracy.py ${MODELS:-notebook fast best-cpu} --seeds 0 1 2 --out "$out" | tee "$out/table.md"
