#!/usr/bin/env bash
# The GPU checks in one go, on a machine with an NVIDIA GPU and CUDA builds of CuPy and PyTorch:
#
#     gpu/run.sh OUTDIR [PART...]        # PART: tests, gpt, rnn, profile (default: the first three, in that order)
#
# It prints the GPUs and the versions of Python, CuPy and PyTorch (also into OUTDIR/versions.txt), then
#   tests  runs the GPU tests, tests/test_gpu*.py, into OUTDIR/gpu-tests.log;
#   gpt    times the training step of the baby GPT (shakespeare-char), minilm on the cupy backend
#          against PyTorch eager on CUDA, in float32, bfloat16 and float16 -> OUTDIR/bench-gpt.json;
#   rnn    the same for the LSTM and GRU at batch 256, in float32 and bfloat16 -> OUTDIR/bench-rnn.json;
#   profile  where the baby GPT's step goes, kernel by kernel, minilm beside PyTorch, in float32 and
#          bfloat16 (python -m minilm.bench.gpu_profile) -> OUTDIR/profile.txt.
# The tables are appended to OUTDIR/bench.txt.
#
# All three take about 10-15 minutes on an H100, a few of them CuPy compiling kernels on a cold
# cache (~/.cupy/kernel_cache; later runs start at once); where one call may run 10 minutes at most,
# run the parts in separate calls. It runs minilm from this checkout whether or not it is installed,
# with the first `python3` on PATH. A failing test does not stop the benchmarks; the script exits
# non-zero at the end if the tests or a benchmark failed.
set -euo pipefail

out="${1:?usage: gpu/run.sh OUTDIR [tests] [gpt] [rnn] [profile]}"
for part in "${@:2}"; do
    case "$part" in tests | gpt | rnn | profile) ;; *) echo "gpu/run.sh: unknown part '$part' (tests, gpt, rnn, profile)" >&2; exit 2 ;; esac
done
parts=" ${*:2} "
[ "$parts" = "  " ] && parts=" tests gpt rnn "
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# pyproject.toml maps reference/, gpu/ and bench/ into the minilm package; a tree of links gives
# Python the same layout with no install. Run from there: the checkout's own minilm/ (which lacks
# those three) would come first on the module path when the current directory is the checkout.
pkg="$(mktemp -d)"
trap 'rm -rf "$pkg"' EXIT
mkdir "$pkg/minilm"
ln -s "$repo"/minilm/* "$pkg/minilm/"
ln -s "$repo/reference" "$pkg/minilm/reference"
ln -s "$repo/gpu" "$pkg/minilm/gpu"
ln -s "$repo/bench" "$pkg/minilm/bench"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
cd "$pkg"

{
    nvidia-smi -L || true
    python3 -c 'import sys; print("python", sys.version.split()[0])'
    python3 -c 'import cupy; print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())' || true
    python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
                "available:", torch.cuda.is_available())' || true
} 2>&1 | tee "$out/versions.txt"

# every GPU test skips without CuPy and a GPU: a run here would say "exit code 0" and check nothing
if ! gpu_error="$(python3 -c 'import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0, "no GPU"' 2>&1)"; then
    echo "gpu/run.sh: CuPy with a GPU is needed, and here: ${gpu_error##*$'\n'}" >&2
    exit 2
fi

tests=0
if [[ $parts == *" tests "* ]]; then
    echo "== GPU tests -> $out/gpu-tests.log"
    python3 -m pytest -q "$repo"/tests/test_gpu*.py -rs 2>&1 | tee "$out/gpu-tests.log" || tests=$?
    echo "GPU tests: exit code $tests"
fi

bench=0
if [[ $parts == *" gpt "* ]]; then
    echo "== GPU benchmark, GPT -> $out/bench.txt, $out/bench-gpt.json"
    python3 -m minilm bench --what train --presets shakespeare-char --backends cupy --dtypes float32 bfloat16 float16 \
        --steps 20 --warmup 5 --rounds 2 --json "$out/bench-gpt.json" 2>&1 | tee -a "$out/bench.txt" || bench=$?
fi
if [[ $parts == *" rnn "* ]]; then
    echo "== GPU benchmark, LSTM and GRU -> $out/bench.txt, $out/bench-rnn.json"
    python3 -m minilm bench --what train --presets shakespeare-lstm shakespeare-gru --backends cupy --dtypes float32 bfloat16 \
        --batch-size 256 --steps 20 --warmup 5 --rounds 2 --json "$out/bench-rnn.json" 2>&1 | tee -a "$out/bench.txt" || bench=$?
fi
if [[ $parts == *" profile "* ]]; then
    echo "== GPU profile of the baby GPT's step -> $out/profile.txt"
    python3 -m minilm.bench.gpu_profile float32 bfloat16 2>&1 | tee "$out/profile.txt" || bench=$?
fi

echo "GPU tests: exit code $tests; benchmarks: exit code $bench; results in $out"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
