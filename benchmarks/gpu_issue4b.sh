#!/usr/bin/env bash
# Device call for issue 4's second batch: allocator setting and long sequences with document
# masks. Also stages the first half of the SmolLM2 GGUF for benchmarks/gpu_issue6.sh.
#   run(command="bash benchmarks/gpu_issue4b.sh", carry=[".whl", ".carry/p1"])
set -uo pipefail
cp .carry/p1/smol.part1 /tmp/smol.part1 2>/dev/null && echo "staged part 1 ($(stat -c %s /tmp/smol.part1) bytes)"
source benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 300 python3 benchmarks/throughput.py \
  --runs sftune,lean --steps 15 --out "$OUT/throughput_expandable.json" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/throughput_expandable.log" | tail -12
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 240 python3 benchmarks/throughput.py \
  --runs doc2048,doc4096,flex4096 --steps 10 --out "$OUT/throughput_long.json" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/throughput_long.log" | tail -12
