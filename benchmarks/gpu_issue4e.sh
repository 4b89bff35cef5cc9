#!/usr/bin/env bash
# Device call for issue 4, fifth batch: the final defaults (compiled loss math, fused AdamW),
# the memory-lean setting (micro-batch 8, activation memory budget 0.8), and document-aware
# packing at 2,048 and 4,096 tokens (FlexAttention, the GPU default for --doc-mask on, and SDPA).
#   run(command="bash benchmarks/gpu_issue4e.sh", carry=[".whl"])
set -uo pipefail
source benchmarks/device_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
timeout 560 python3 benchmarks/throughput.py --steps 15 --out "$OUT/throughput.json" \
  --runs "${RUNS:-baseline,sftune,lean,flex2048,flex4096,doc2048,doc4096}" \
  2>&1 | grep -v "Warning\|warn(" | tee "$OUT/throughput.log"
