"""Baseline: TRL (1.16) SFTTrainer on the same data and packing as sftune, for GPU comparisons.

Data: JSONL files of {"prompt": ..., "response": ...} records (also accepted: instruction [+ input]
/ output), rendered with the Alpaca template and the tokenizer's EOS appended, as one "text" field.
Packing like sftune's: documents concatenated and cut into fixed max_length chunks
(SFTConfig packing=True, packing_strategy="wrapped"; TRL packs within each 1000-document map
batch, so one short tail chunk per 1000 documents is padded). The loss is on all tokens of the
chunk by default (a language-modeling dataset); --completion-only switches to a prompt/completion
dataset where TRL masks the prompt tokens (completion_only_loss).

Nothing is downloaded: the model and tokenizer come from a local dir, the data from in-memory lists
(datasets.Dataset.from_list), report_to="none"; set HF_HUB_OFFLINE=1 (benchmarks/device_setup.sh does).

Usage (GPU):
    python benchmarks/trl_sft.py --model DIR --train train.jsonl --val val.jsonl \
        --max-length 512 --batch 16 --accum 2 --lr 2e-5 --out $OUT/trl.json
    add --max-steps N to stop early, --model-dtype float32 for TRL's own default (fp32 weights +
    bf16 autocast), --liger for TRL's liger-kernel path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
)
ALPACA_PROMPT = ALPACA.split("{response}")[0]


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _prompt_response(r: dict) -> tuple[str, str]:
    if "prompt" in r:
        return r["prompt"], r["response"]
    if "question" in r:  # GSM8K
        return r["question"], r["answer"]
    prompt = r["instruction"]
    if r.get("input"):
        prompt = f"{prompt}\n\n{r['input']}"
    return prompt, r["output"]


def to_records(rows: list[dict], eos: str, completion_only: bool) -> list[dict]:
    out = []
    for r in rows:
        p, resp = _prompt_response(r)
        if completion_only:
            out.append({"prompt": ALPACA_PROMPT.format(prompt=p), "completion": resp + eos})
        else:
            out.append({"text": ALPACA.format(prompt=p, response=resp) + eos})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", required=True, help="local HF model dir (config, weights, tokenizer)"
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="per-device train batch (sequences)")
    ap.add_argument("--eval-batch", type=int, default=None)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup-ratio", type=float, default=0.03)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument(
        "--model-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="weights dtype; auto = bfloat16 on CUDA (like sftune), float32 on CPU",
    )
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (CPU default)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--optim", default="adamw_torch_fused")
    ap.add_argument("--completion-only", action="store_true")
    ap.add_argument(
        "--liger", action="store_true", help="use_liger_kernel=True (needs liger-kernel)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--output-dir", default="/tmp/trl_sft_out")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype_name = a.model_dtype if a.model_dtype != "auto" else ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    bf16 = cuda and not a.no_bf16

    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos = tok.eos_token
    train_ds = datasets.Dataset.from_list(to_records(read_jsonl(a.train), eos, a.completion_only))
    val_ds = datasets.Dataset.from_list(to_records(read_jsonl(a.val), eos, a.completion_only))

    t_load = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            a.model, dtype=dtype, attn_implementation=a.attn, local_files_only=True
        )
    except TypeError:  # older transformers
        model = AutoModelForCausalLM.from_pretrained(
            a.model, torch_dtype=dtype, attn_implementation=a.attn, local_files_only=True
        )
    load_s = time.perf_counter() - t_load

    cfg = SFTConfig(
        output_dir=a.output_dir,
        max_length=a.max_length,
        packing=True,
        packing_strategy="wrapped",
        eval_packing=True,
        completion_only_loss=a.completion_only,
        per_device_train_batch_size=a.batch,
        per_device_eval_batch_size=a.eval_batch or a.batch,
        gradient_accumulation_steps=a.accum,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        # transformers 5.x: warmup_ratio is gone; a float < 1 in warmup_steps is the ratio
        warmup_steps=a.warmup_ratio,
        weight_decay=a.weight_decay,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        optim=a.optim,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,  # SFTConfig defaults to True
        eval_strategy="no",
        save_strategy="no",
        logging_steps=a.logging_steps,
        report_to="none",
        seed=a.seed,
        max_grad_norm=1.0,
        use_liger_kernel=a.liger,
        dataloader_num_workers=0,
        use_cpu=not cuda,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tok,
        callbacks=[timer],
    )
    n_chunks = len(trainer.train_dataset)
    chunk_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_out = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None

    t1 = time.perf_counter()
    ev = trainer.evaluate()
    eval_s = time.perf_counter() - t1

    steps = trainer.state.global_step
    seqs_per_step = a.batch * a.accum * max(1, trainer.args.world_size)
    tokens_per_step = seqs_per_step * a.max_length
    timed = timer.times[2:] or timer.times
    res = dict(
        framework="trl",
        trl=trl.__version__,
        transformers=transformers.__version__,
        datasets=datasets.__version__,
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        model=a.model,
        model_dtype=dtype_name,
        bf16_autocast=bf16,
        attn=a.attn,
        optim=a.optim,
        liger=a.liger,
        completion_only=a.completion_only,
        max_length=a.max_length,
        batch=a.batch,
        accum=a.accum,
        lr=a.lr,
        steps=steps,
        train_chunks=n_chunks,
        train_chunk_tokens=chunk_tokens,
        eval_loss=ev.get("eval_loss"),
        eval_time_s=eval_s,
        final_train_loss=train_out.training_loss,
        train_wall_s=train_s,
        train_runtime_s=train_out.metrics.get("train_runtime"),
        train_tokens_per_s=steps * tokens_per_step / train_s,
        steady_tokens_per_s=tokens_per_step * len(timed) / sum(timed) if timed else None,
        step_times_s=timer.times,
        peak_memory_bytes=peak,
        load_time_s=load_s,
        log_history=trainer.state.log_history,
    )
    print(
        f"TRL {trl.__version__}: steps={steps} eval_loss={res['eval_loss']:.4f} "
        f"train_loss={res['final_train_loss']:.4f} tok/s={res['train_tokens_per_s']:.0f} "
        f"(steady {res['steady_tokens_per_s'] or float('nan'):.0f}) wall={train_s:.1f}s "
        f"peak_mem={'-' if peak is None else f'{peak / 2**30:.2f} GiB'}"
    )
    assert math.isfinite(res["eval_loss"])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
