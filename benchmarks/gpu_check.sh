#!/usr/bin/env bash
# Everything fmnist has to check on a CUDA GPU, as one command:
#
#   bash benchmarks/gpu_check.sh            # results in $OUT, or ./gpu-check
#
# 1. the CUDA tests (`pytest -m cuda`; two of them need the data),
# 2. `fmnist bench --device cuda` (fmnist against the textbook loop, on the GPU, real images),
# 3. the notebook's full experiment on the GPU (`fmnist train --device cuda`),
# 4. the `best` preset on the GPU, seeds $BEST_SEEDS (default 0; "0,1,2" for the README's
#    mean ± std), its summary.json copied to $OUT.
# 2-4 need the data (FMNIST_DATA, or a copy in .data/fashion-mnist); without it they are
# skipped and the script fails, since measuring them is its point.
# It runs from the source tree with the machine's own PyTorch (no install, no network):
# numpy, numba, safetensors, matplotlib, tqdm, onnx and onnxruntime must already be there.
# The data travels as a copy in an ignored folder, e.g. .data/fashion-mnist.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -z "${FMNIST_DATA:-}" ] && [ -d .data/fashion-mnist ]; then
    export FMNIST_DATA="$PWD/.data/fashion-mnist"
fi
python=${PYTHON:-python3}

{ nvidia-smi; "$python" -c "import torch, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'numba', numba.__version__, 'gpu', torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
"$python" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$out/tests.txt"
status=${PIPESTATUS[0]}
if [ -z "${FMNIST_DATA:-}" ]; then
    echo "no data (FMNIST_DATA or .data/fashion-mnist): benchmark and full run skipped" | tee "$out/bench.txt"
    status=1
else
    "$python" -m fmnist bench --device cuda --json > "$out/bench.json" 2> "$out/bench.txt" || status=1
    run=$(mktemp -d)/seed
    TIMEFORMAT="wall time %R s"
    { time "$python" -m fmnist train --device cuda --out "$run" --quiet > "$out/train.txt" 2>&1 || status=1; } \
        2>> "$out/train.txt"
    cp "$run/metrics.json" "$run/history.csv" "$out/" 2>/dev/null
    best=$(mktemp -d)/best
    { time "$python" -m fmnist train --model best --device cuda --seeds "${BEST_SEEDS:-0}" --out "$best" --quiet \
        > "$out/best.txt" 2>&1 || status=1; } 2>> "$out/best.txt"
    cp "$best/summary.json" "$out/best-summary.json" 2>/dev/null
    for history in "$best"/*/history.csv; do cp "$history" "$out/best-$(basename "$(dirname "$history")").csv"; done
fi
exit "$status"
