#!/usr/bin/env bash
# The GPU rows of bench/latency.py in one prepared run on a lent device machine (issue 18).
# That machine runs its own python3 (torch with CUDA, numpy, onnxruntime, h5py are there) and
# reaches no package registry, so the few pure-Python packages our code imports that it lacks
# travel as wheels. Prepare them here once, then run this script there:
#
#   mkdir -p .gpu_wheels && echo /.gpu_wheels/ >> .git/info/exclude
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 --no-deps -d .gpu_wheels \
#       hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 gymnasium==1.4.0 \
#       cloudpickle farama-notifications
#   device run: carry [".gpu_wheels"], command "bash scripts/gpu_latency.sh", timeout_s 540
#
# It writes $OUT/latency_gpu.json + .png (copy them to bench/results/ and say so in
# docs/results/latency.md with the device line from the JSON's run_info).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links .gpu_wheels hydra-core omegaconf gymnasium \
    2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=. python3 -c "import torch, policy; print('torch', torch.__version__, torch.cuda.get_device_name())"
PYTHONPATH=. timeout 300 python3 bench/latency.py --device cuda --threads 16 \
    --runtimes eager cuda_graph --batch 1 10 --chunks 50 --warmup 5 \
    --out "$OUT/latency_gpu.json" 2>&1 | tee "$OUT/latency_gpu.log"
# the crossover of sampler=auto's candidates on the GPU (issue 30): latency vs batch per runtime
PYTHONPATH=. timeout 200 python3 bench/crossover.py --device cuda --threads 16 \
    --runtimes eager cuda_graph --batches 1 10 20 --chunks 5 \
    --out "$OUT/crossover_gpu.json" 2>&1 | tee "$OUT/crossover_gpu.log" || true
