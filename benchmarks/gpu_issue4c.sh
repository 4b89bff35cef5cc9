#!/usr/bin/env bash
# Device call for issue 4, third batch: the GEMM/attention floor of a step, a kernel profile of
# the default and lean runs, and the levers not measured before (compiled loss math, cuDNN
# attention, the compiler's activation memory budget at micro-batch 8, max-autotune).
#   run(command="bash benchmarks/gpu_issue4c.sh", carry=[".whl"])
set -uo pipefail
source benchmarks/device_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv
timeout 90 python3 benchmarks/gemm_floor.py --out "$OUT/gemm_floor.json" 2>&1 | tee "$OUT/gemm_floor.log"
timeout 330 python3 benchmarks/throughput.py --steps 12 --out "$OUT/levers.json" \
  --runs "${RUNS:-sftune,sftune+ce0,sftune+cudnn,lean,sftune-mb8,sftune-mb8+budget0.5}" \
  --profile sftune,lean 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/levers.log"
timeout 150 python3 benchmarks/throughput.py --steps 12 --out "$OUT/autotune.json" \
  --runs sftune+autotune 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/autotune.log" | tail -5
