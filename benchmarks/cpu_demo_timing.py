"""CPU timings that size the demo: preset load, train-step speed, and a short demo run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_demo_timing.py --part all --json out.json
    .venv/bin/python benchmarks/cpu_demo_timing.py --part steps --micro-batches 1 2 4 --seq-lengths 128 256 512
    .venv/bin/python benchmarks/cpu_demo_timing.py --part demo --seq-length 256 --micro-batch 2 --accum 1 --steps 30 --n-val 80

Parts:
  load   convert the smollm2-135m preset from its GGUF into a fresh cache dir, then reload it
  steps  forward + backward + AdamW step of SmolLM2-135M (fp32, SDPA) per micro-batch x length
  demo   a plain training loop on the demo dataset: val loss before/after, two generations

The demo part packs its own data with a fixed Alpaca-style template (BOS per document, EOS
after it, loss on every token), so it does not depend on the rest of sftune.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sftune.demo_data import DEFAULT_N_TRAIN, DEFAULT_N_VAL, write_demo_dataset  # noqa: E402
from sftune.models import load_model_and_tokenizer, model_flops_per_token  # noqa: E402

CPU = torch.device("cpu")
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def time_load(cache_dir: Path | None) -> dict:
    """Seconds for the first load (GGUF -> dense -> save) and the cached reload."""
    cache = Path(cache_dir or tempfile.mkdtemp(prefix="sftune-bench-cache-"))
    os.environ["SFTUNE_CACHE_DIR"] = str(cache)
    t0 = time.perf_counter()
    load_model_and_tokenizer("smollm2-135m", device=CPU)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model_and_tokenizer("smollm2-135m", device=CPU)
    cached = time.perf_counter() - t0
    return {"first_load_s": round(first, 2), "cached_load_s": round(cached, 2), "cache": str(cache)}


def time_steps(micro_batches: list[int], seq_lengths: list[int], steps: int) -> list[dict]:
    """Seconds per fwd+bwd+AdamW step on random tokens (min and mean), after one warm-up step."""
    model, _, info = load_model_and_tokenizer("smollm2-135m", device=CPU)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []
    for mb in micro_batches:
        for seq in seq_lengths:
            ids = torch.randint(0, model.config.vocab_size, (mb, seq))
            times = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            # The minimum is the least disturbed by other processes on a shared machine.
            step_s, mean_s = min(times[1:]), sum(times[1:]) / steps
            flops = model_flops_per_token(model.config, seq) * mb * seq
            row = {
                "micro_batch": mb,
                "seq_length": seq,
                "step_s": round(step_s, 3),
                "mean_step_s": round(mean_s, 3),
                "tokens_per_s": round(mb * seq / step_s, 1),
                "gflops_per_s": round(flops / step_s / 1e9, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def pack(tokenizer, path: Path, seq_length: int) -> torch.Tensor:
    """(n, seq_length + 1) chunks of BOS + prompt + response + EOS, documents concatenated."""
    stream: list[int] = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        text = TEMPLATE.format(prompt=record["prompt"]) + record["response"]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = (len(stream) - 1) // seq_length
    # Chunk i holds tokens [i*m, (i+1)*m], so inputs and labels are one chunk shifted by one.
    return torch.tensor([stream[i * seq_length : (i + 1) * seq_length + 1] for i in range(n)])


@torch.no_grad()
def val_loss(model, chunks: torch.Tensor, micro_batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), micro_batch):
        batch = chunks[i : i + micro_batch]
        logits = model(input_ids=batch[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def generate(model, tokenizer, prompt: str) -> str:
    ids = [tokenizer.bos_token_id, *tokenizer(TEMPLATE.format(prompt=prompt)).input_ids]
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def run_demo(args) -> dict:
    """A plain loop: AdamW, linear warmup then cosine, val loss every `eval_every` steps."""
    t_start = time.perf_counter()
    model, tokenizer, _ = load_model_and_tokenizer("smollm2-135m", device=CPU)
    data = Path(tempfile.mkdtemp(prefix="sftune-demo-"))
    train_path, val_path = write_demo_dataset(data, n_train=args.n_train, n_val=args.n_val)
    train = pack(tokenizer, train_path, args.seq_length)
    val = pack(tokenizer, val_path, args.seq_length)
    gen = torch.Generator().manual_seed(0)
    train = train[torch.randperm(len(train), generator=gen)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(args.warmup_ratio * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    samples = ["What is 34 + 51? Answer with the number.", "Give the capital of Norway."]
    result = {"train_chunks": len(train), "val_chunks": len(val), "curve": []}
    result["before_samples"] = [generate(model, tokenizer, p) for p in samples]
    t0 = time.perf_counter()
    result["curve"].append({"step": 0, "val_loss": round(val_loss(model, val, 8), 4)})
    result["first_eval_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    model.train()
    cursor, t_train = 0, time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss_sum = 0.0
        for _ in range(args.accum):
            batch = train[cursor % len(train) : cursor % len(train) + args.micro_batch]
            cursor += args.micro_batch
            logits = model(input_ids=batch[:, :-1]).logits
            # Sum, then divide by all trained tokens of the optimizer step.
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
            ) / (args.micro_batch * args.accum * args.seq_length)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "train_loss": round(loss_sum, 4)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row["val_loss"] = round(val_loss(model, val, 8), 4)
        row["elapsed_s"] = round(time.perf_counter() - t_train, 1)
        result["curve"].append(row)
        print(json.dumps(row), flush=True)
    result["train_loop_s"] = round(time.perf_counter() - t_train, 1)
    result["after_samples"] = [generate(model, tokenizer, p) for p in samples]
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["load", "steps", "demo", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="for --part load")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    parser.add_argument("--n-val", type=int, default=DEFAULT_N_VAL)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    if args.part in ("load", "all"):
        results["load"] = time_load(args.cache_dir)
        print(json.dumps(results["load"]), flush=True)
    if args.part in ("steps", "all"):
        results["steps"] = time_steps(args.micro_batches, args.seq_lengths, args.timed_steps)
    if args.part in ("demo", "all"):
        results["demo"] = run_demo(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
