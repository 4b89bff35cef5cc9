#!/usr/bin/env bash
# One device call for issue 4: GPU tests, then the throughput runs. Results land in $OUT.
#   run(command="bash benchmarks/gpu_issue4.sh 'baseline,sftune'", carry=[".whl"])
set -uo pipefail
RUNS="${1:-baseline,sftune,sftune-mb16,lean}"
STEPS="${2:-20}"
source benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -25 "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
python3 benchmarks/throughput.py --runs "$RUNS" --steps "$STEPS" --out "$OUT/throughput.json" 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/throughput.log" | tail -60
