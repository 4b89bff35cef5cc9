"""The peer: TRL's SFTTrainer on the same model, data, rendering and packing as `sftune train`.

Records are read and rendered by sftune itself (`sftune.data`: the Alpaca template, or the
tokenizer's chat template for `messages`), the tokenizer's EOS appended, and handed to TRL as
one "text" field per document. TRL packs them like sftune: documents concatenated and cut into
fixed max_length chunks (packing_strategy="wrapped"; TRL packs within each 1,000-document map
batch, so one short tail chunk per 1,000 documents is padded). The loss is on every token by
default; --completion-only gives TRL prompt/completion pairs and it masks the prompt tokens.
Everything else is TRL's own: its data collator, its Trainer loop, its optimizer and schedule.

Nothing is downloaded: `--model` is a local model directory or an sftune preset (its converted
copy is used), and Hugging Face hub access is switched off.

    # what `benchmarks/gpu.sh trl` runs (GSM8K, 32 sequences of 512 tokens per step):
    python benchmarks/trl_sft.py --model smollm2-135m --train gsm8k/train.jsonl \\
        --val gsm8k/test.jsonl --fields question=prompt,answer=response --max-length 512 \\
        --batch 16 --accum 2 --lr 1e-4 --epochs 3 --model-dtype float32 --out trl.json

--max-steps N stops early; --liger takes TRL's liger-kernel path (needs liger-kernel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sftune.data import read_records, render_record  # noqa: E402
from sftune.data.formats import parse_fields  # noqa: E402
from sftune.models import resolve_source  # noqa: E402


def documents(path: str, fields: str | None, tokenizer, completion_only: bool) -> list[dict]:
    """The file's records as TRL rows: {"text"}, or {"prompt", "completion"} with
    --completion-only; rendered by sftune, each ended with the EOS token."""
    rows = []
    for record in read_records(path, parse_fields(fields)):
        prompt_part, text = render_record(record, tokenizer)
        if completion_only:
            completion = text[len(prompt_part) :] + tokenizer.eos_token
            rows.append({"prompt": prompt_part, "completion": completion})
        else:
            rows.append({"text": text + tokenizer.eos_token})
    return rows


def sft_config(a: argparse.Namespace, cuda: bool):
    """TRL's config for the same recipe as `sftune train`."""
    from trl import SFTConfig

    return SFTConfig(
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
        bf16=cuda and not a.no_bf16,
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


def step_timer(cuda: bool):
    """A TrainerCallback that records each optimizer step's wall time (GPU work included)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="local model directory or sftune preset")
    ap.add_argument("--train", required=True, help="training records (as `sftune train` reads)")
    ap.add_argument("--val", required=True)
    ap.add_argument("--fields", default=None, help="as sftune's --fields, e.g. question=prompt")
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
        help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU",
    )
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (CPU default)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--optim", default="adamw_torch_fused")
    ap.add_argument("--completion-only", action="store_true")
    ap.add_argument("--liger", action="store_true", help="use_liger_kernel=True")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--output-dir", default="runs/trl_sft")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype_name = a.model_dtype if a.model_dtype != "auto" else ("bfloat16" if cuda else "float32")
    model_dir, _ = resolve_source(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train = datasets.Dataset.from_list(documents(a.train, a.fields, tok, a.completion_only))
    val = datasets.Dataset.from_list(documents(a.val, a.fields, tok, a.completion_only))
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=getattr(torch, dtype_name),
        attn_implementation=a.attn,
        local_files_only=True,
    )
    load_s = time.perf_counter() - t_load

    timer = step_timer(cuda)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(a, cuda),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tok,
        callbacks=[timer],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    t1 = time.perf_counter()
    eval_loss = trainer.evaluate().get("eval_loss")
    eval_s = time.perf_counter() - t1

    steps = trainer.state.global_step
    tokens_per_step = a.batch * a.accum * max(1, trainer.args.world_size) * a.max_length
    timed = timer.times[2:] or timer.times
    res = dict(
        framework="trl",
        trl=trl.__version__,
        transformers=transformers.__version__,
        datasets=datasets.__version__,
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        model=str(model_dir),
        model_dtype=dtype_name,
        args=vars(a),
        steps=steps,
        train_chunks=len(trainer.train_dataset),
        train_chunk_tokens=sum(len(x) for x in trainer.train_dataset["input_ids"]),
        eval_loss=eval_loss,
        eval_time_s=eval_s,
        final_train_loss=train_out.training_loss,
        train_wall_s=train_s,
        train_tokens_per_s=steps * tokens_per_step / train_s,
        steady_tokens_per_s=tokens_per_step * len(timed) / sum(timed) if timed else None,
        step_times_s=timer.times,
        peak_memory_bytes=peak,
        load_time_s=load_s,
        log_history=trainer.state.log_history,
    )
    print(
        f"TRL {trl.__version__}: steps={steps} eval_loss={eval_loss:.4f} "
        f"train_loss={res['final_train_loss']:.4f} tok/s={res['train_tokens_per_s']:.0f} "
        f"(steady {res['steady_tokens_per_s'] or float('nan'):.0f}) wall={train_s:.1f}s "
        f"peak_mem={'-' if peak is None else f'{peak / 2**30:.2f} GiB'}"
    )
    assert math.isfinite(eval_loss)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
