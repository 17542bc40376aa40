#!/usr/bin/env bash
# The serving engine's GPU checks and figures in one run, for a lent GPU (docs/benchmarks.md#gpu).
#
# Here, once:   ../shared/tools/gpu-wheels.sh .whl      (pydantic, omegaconf, typer: the GPU image lacks them;
#               add transformers and its wheels to the list for the HF comparison)
# There:        bash benchmarks/gpu_checks.sh            (the device tool's run, with carry [".whl"])
#
# Each step has its own time limit and writes its output under $OUT, so a step that fails or runs long
# does not lose the others; seven files come back (the device tool returns eight at most).
# At most 9 minutes in all (the limits add up to 535 s), under the device
# tool's 10 minutes per command: run it with timeout_s 600.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a limit, its output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name ($limit s): $*"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.txt"))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# 1. exactness on the GPU: gather and CUDA graphs in float64, compiled FlexAttention in float32
step tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_serving_cuda.py

# 2. the issue's GPU workload: 360M-shaped MoR against its vanilla counterpart (random weights), eager
#    (FlexAttention over the pool, the CUDA default) and with compiled decode graphs
BENCH=(recipes/paper/mor_expert_360m.yaml --device cuda --dtype bfloat16 --batch 256 --num-prompts 256
       --prompt-len 1024 --max-new-tokens 256 --repeats 2 --json)
step bench_360m 90 python3 -m adaptive bench "${BENCH[@]}"
step bench_360m_compiled 120 python3 -m adaptive bench "${BENCH[@]}" --compile

# 3. where the time goes as the batch grows, every kernel: gather, flex, gather compiled (tiny shape)
SB=(recipes/mor_expert.yaml --device cuda --dtype bfloat16 --batches 1,32,128,256 --new-tokens 64 --repeats 2)
step batch_gather 60 python3 benchmarks/serving_batch.py "${SB[@]}" --paged-attention gather --compile both
step batch_flex 40 python3 benchmarks/serving_batch.py "${SB[@]}" --paged-attention flex

# 4. ours against HF generate on the same 360M-shaped weights (needs transformers; skipped without it)
if python3 -c "import transformers" 2>/dev/null; then
  step hf_360m 75 python3 benchmarks/generate_hf.py --preset smollm-360m --batch 256 --prompt-len 128 \
    --new-tokens 256 --device cuda --dtype bfloat16 --repeats 2 --compile --json
else
  echo "transformers is not installed: no HF comparison" | tee "$OUT/hf_360m.txt"
fi
