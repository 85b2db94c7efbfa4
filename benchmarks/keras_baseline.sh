#!/usr/bin/env bash
# The classic Keras notebook, measured as the baseline of docs/results.md's time-to-accuracy
# table: TensorFlow (CPU) in a virtual environment of its own (.venv-keras; never a dependency
# of fmnist), the notebook's model on fmnist's data and validation split.
#
#   bash benchmarks/keras_baseline.sh                 # writes $OUT/keras.json (default results/)
#
# Run it back to back with benchmarks/accuracy.sh (which calls it), on the same idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
data="${FMNIST_DATA:-$HOME/.cache/fmnist}"
if [ ! -x .venv-keras/bin/python ]; then
    python3 -m venv .venv-keras
    .venv-keras/bin/pip install --quiet "tensorflow-cpu==2.21.0"
fi
.venv/bin/python benchmarks/accuracy.py --write-split "$out/split.npz"
.venv-keras/bin/python benchmarks/keras_notebook.py --data "$data" --split "$out/split.npz" > "$out/keras.json"
cat "$out/keras.json"
