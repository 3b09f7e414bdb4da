#!/usr/bin/env bash
# rig_jax against the PyTorch peers on one lent GPU, in one call (docs/benchmarks.md, "GPU").
#
# Prepared once on the development machine, in the repository root (no device time):
#   echo /.whl/ >> .git/info/exclude; echo /bench/ >> .git/info/exclude
#   mkdir -p bench && cp ../shared/bench/peer_baseline.py bench/     # the peers' own script
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 ml-collections==1.1.0 importlib-metadata zipp
# Then one device call, carrying both folders:
#   run(command="bash tools/gpu_bench.sh", carry=[".whl", "bench"], timeout_s=570)
#
# What it runs, each bounded so the whole stays under the 10-minute call:
#   1. peer_baseline.py (BUDGET_S=200: eager batches, then torch.compile if under 120 s by then):
#      diffusers eager fp16 and torch.compile SD-1.5 DDIM (512², 50 steps, CFG 7.5) and transformers generate (Qwen2-1.5B shapes, batch 64,
#      prompt 256, 128 new tokens), plus JAX's bf16 matmul rate on the card;
#   2. rig-benchmark sampler --shape sd15 --batch 8 32 --peer (rig_jax bf16 against diffusers
#      eager fp16 on the same saved U-Net, interleaved, parity included);
#   3. rig-benchmark decode --shape qwen2-1.5b --batch 64 --peer (against transformers generate,
#      greedy, same weights);
#   4. the three summary lines of issue 12 from those JSON lines (rig_jax/bench/gpu_summary.py).
# Everything lands in $OUT (the device tool returns it); the summary is also printed last. A
# line a step's timeout cut off is simply missing (the summary says `not measured`); with more
# device time, run step 1 and steps 2-4 as two calls with longer timeouts.
set -uo pipefail
OUT=${OUT:-/tmp/rig_gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git log --oneline -1 2>/dev/null | tee "$OUT/commit.txt"

PEER=${PEER_BASELINE:-bench/peer_baseline.py}
if [ -f "$PEER" ]; then
    BUDGET_S=${PEER_BUDGET_S:-200} timeout 240 python3 "$PEER" 2>"$OUT/peer_baseline.err" \
        | tee "$OUT/peer_baseline.jsonl"
else
    echo "no $PEER: copy ../shared/bench/peer_baseline.py to bench/ and carry it" | tee "$OUT/peer_baseline.err"
fi

CACHE=/tmp/rig_bench_models
timeout 200 python3 -m rig_jax.tools.benchmark sampler --shape sd15 --batch 8 32 --repeats 2 --peer \
    --device gpu --config.cache_dir=$CACHE 2>"$OUT/sampler.err" | tee "$OUT/sampler.jsonl"
timeout 110 python3 -m rig_jax.tools.benchmark decode --shape qwen2-1.5b --batch 64 --repeats 2 --peer \
    --device gpu --config.cache_dir=$CACHE 2>"$OUT/decode.err" | tee "$OUT/decode.jsonl"
python3 -m rig_jax.bench.gpu_summary "$OUT" | tee "$OUT/summary.txt"
