#!/usr/bin/env bash
# The GPU check, one script, under 8 minutes on an H100: the kernel and CUDA tests, then ViT-B/16 bfloat16
# batch 64 with ToMe r=13 and TopK (with and without CUDA graphs) and the LLaVA-shaped FastV prefill in
# float16. JSON lands in benchmarks/<gpu name>/; gpu_check.json there says what ran and how each step ended.
#
#   bash tools/gpu_check.sh            # on a machine with an NVIDIA GPU, after tools/setup.sh
#   bash tools/gpu_check.sh --quick    # tiny sizes on the CPU: checks the script itself (benchmarks/cpu-quick/)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--quick" ]; then
  # a 2-core CPU compiles far slower than a GPU machine's 16 cores: SLOW stretches the time limits
  DEVICE=cpu VIT=vit_tiny_patch16_224 BATCH=2 RUNS=3 VLM="--layers 4 --runs 2" OUT=benchmarks/cpu-quick SLOW=5
else
  DEVICE=cuda VIT=vit_base_patch16_224 BATCH=64 RUNS=50 VLM="--runs 20" OUT="" SLOW=1
fi
if [ -z "$OUT" ]; then
  NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '_'))") || {
    echo "no CUDA GPU visible to torch: run on a GPU machine, or pass --quick" >&2; exit 1; }
  OUT=benchmarks/$NAME
fi
mkdir -p "$OUT"
STEPS=()

step() {            # step NAME SECONDS COMMAND...: run with a time limit, record how it ended
  local name=$1 limit=$(($2 * SLOW)); shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  STEPS+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}")
}

if [ "$DEVICE" = cuda ]; then
  step tests 120 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/runtime/kernels --junitxml="$OUT/gpu_tests.xml"
fi
step vit_tome 150 "$PYTHON" tools/bench.py --device "$DEVICE" --dtype bfloat16 --model "$VIT" --batch "$BATCH" \
  --runs "$RUNS" --policy tome --r 13 --cudagraphs --skip-eager --json "$OUT/vit_b16_tome.json"
step vit_topk 120 "$PYTHON" tools/bench.py --device "$DEVICE" --dtype bfloat16 --model "$VIT" --batch "$BATCH" \
  --runs "$RUNS" --policy topk --layers 3 6 9 --keep 0.7 --cudagraphs --skip-eager --json "$OUT/vit_b16_topk.json"
# shellcheck disable=SC2086
step llava_fastv_prefill 90 "$PYTHON" tools/bench_vlm.py --device "$DEVICE" --dtype float16 $VLM --new-tokens 4 \
  --only "fastv K=2 keep=0.25" --json "$OUT/llava_fastv_prefill.json"

{
  echo "{\"device\": \"$OUT\", \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null)\", \"steps\": ["
  (IFS=,; echo "${STEPS[*]}")
  echo "]}"
} > "$OUT/gpu_check.json"
echo "written: $OUT/gpu_check.json"
