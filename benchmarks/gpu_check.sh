#!/usr/bin/env bash
# One prepared GPU check (a few minutes on an H100): the erasure benchmark on CUDA, then the test suite's GPU view.
# Usage on a GPU machine with CUDA torch and the project installed:  bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python benchmarks/bench_erase.py --device cuda --reps 5 --slow-reps 1 | tee "$out/bench_erase_cuda.json"
python benchmarks/bench_erase.py --device cuda --concepts 100 --skip-compare | tee "$out/bench_erase_cuda_n100.json"
python benchmarks/bench_erase.py --device cuda --model sdxl --skip-compare --unet-reps 3 | tee "$out/bench_erase_cuda_sdxl.json"
python -m pytest -q -x tests/test_closed_form.py tests/test_module.py 2>&1 | tail -3 | tee "$out/tests.txt"
