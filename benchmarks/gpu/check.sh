#!/usr/bin/env bash
# The GPU checks in one go, most important first, each under its own time limit so that a slow one leaves the
# others their results (about 9 minutes on an H100-class GPU, compilation included; nothing to install where
# torch with CUDA, numpy, pyyaml, scikit-learn, matplotlib and pillow are present):
#   1. the tests that need CUDA: no synchronising call inside a training step (CUDA's own detector), the pinned
#      copies, the fused optimiser
#   2. vitcl bench dytox/cifar100-b0inc10 at 1, 10 and 50 tasks, fp32 and bf16, not compiled
#   3. the target row: 10 tasks, bf16, compiled, batch 128 (at least 10,000 training images/s on an H100)
#   4. one real epoch of CIFAR-shaped data (50,000 images) under overlays/fast, batch 128 per GPU as published
#
#     bash benchmarks/gpu/check.sh [OUT_DIR]      (default runs/gpu-check)
#
# It stays under one device call (10 minutes). With device time left after it, a second call (at most 3 minutes):
#     python3 benchmarks/compile_token_shapes.py --tasks 1,2,3,5,9,10 --batch 128 --steps 10 --warmup 3 \
#         --precision bf16      (the compiled decoder, token count dynamic or padded to power-of-two buckets)
#
# Each part's output is in OUT_DIR/<part>.log; the Markdown tables end the bench and epoch logs, ready for
# BENCHMARKS.md (sections "Training throughput on <device>" and "One epoch of CIFAR-shaped data on <device>").
set -o pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, \
torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT_DIR/device.log" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$OUT_DIR/device.log" 2>&1

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*" | tee "$OUT_DIR/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$OUT_DIR/$name.log"
}

part sync 90 python3 -m pytest -q -p no:cacheprovider tests/test_host_sync.py tests/test_optim_kernel.py \
    -k "cuda or gpu or fused" -rA
part bench-eager 100 python3 benchmarks/gpu/throughput.py --tasks 1,10,50 --precision fp32,bf16 --compile off \
    --steps 20 --warmup 5 --batch 128
part bench-compiled 200 python3 benchmarks/gpu/throughput.py --tasks 10 --precision bf16 --compile on \
    --steps 20 --warmup 5 --batch 128
part epoch 180 python3 benchmarks/gpu/epoch_time.py --variants overlays/fast --epochs 2 train.batch_size=128 \
    run.progress=false
