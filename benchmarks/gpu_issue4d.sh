#!/usr/bin/env bash
# Device call for issue 4, fourth batch: GPU tests, then the course loop against sftune with the
# compiled loss math and compiled clipping + AdamW (default), the fused-AdamW variant, and the
# memory-lean candidates at micro-batch 8 (compile's activation memory budget).
#   run(command="bash benchmarks/gpu_issue4d.sh", carry=[".whl"])
set -uo pipefail
source benchmarks/device_setup.sh > /tmp/setup.log 2>&1 || { cat /tmp/setup.log; exit 1; }
python3 - <<'PY' 2>&1 | tee "$OUT/addmm_check.log"
import torch
from sftune.train import loss
w = torch.zeros(512, 256, device="cuda"); g = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
h = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
loss._accumulate_wgrad(w, g, h); loss._accumulate_wgrad(w, g, h)
ref = 2 * (g.double().t() @ h.double())
print("fp32-output addmm in place:", loss._addmm_out_dtype, "rel err", float((w.double() - ref).norm() / ref.norm()))
PY
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
timeout 420 python3 benchmarks/throughput.py --steps 20 --out "$OUT/throughput.json" \
  --runs "${RUNS:-baseline,sftune,sftune+fusedadam,sftune-mb8,sftune-mb8+budget0.8,sftune-mb8+budget0.7,lean}" \
  --profile sftune 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/throughput.log"
