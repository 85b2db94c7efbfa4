#!/usr/bin/env bash
# Regenerate the README's results table and docs/results.md's time-to-accuracy table: the
# classic Keras notebook (benchmarks/keras_baseline.sh, its own TensorFlow venv), then each
# CPU preset and the notebook, back to back on the same machine, one fresh `fmnist train`
# process per seed, the machine otherwise idle.
#
#   bash benchmarks/accuracy.sh                  # Keras ~3 min, notebook 3 x 1 min, fast 5 x 1 min, best-cpu 3 x 30 min
#   MODELS="fast" SEEDS="0 1 2 3 4" bash benchmarks/accuracy.sh
#
# Runs land in $OUT (default results/), reused if a rerun finds them finished; the tables are
# printed and kept in $OUT/table.md, the numbers in $OUT/results.json. `best` needs a GPU:
# benchmarks/gpu_check.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
[ -f "$out/keras.json" ] || OUT="$out" bash benchmarks/keras_baseline.sh > /dev/null
.venv/bin/python benchmarks/accuracy.py ${MODELS:-notebook fast best-cpu} --seeds ${SEEDS:-0 1 2} --out "$out" \
    --keras "$out/keras.json" | tee "$out/table.md"
