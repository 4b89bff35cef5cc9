"""FP8 against bf16 on real text: the same model trained once per recipe, losses side by side.

The Llama 3.1 8B config (random init, seed 0 unless --seed) trains on GSM8K train rendered with
the Alpaca template and packed by sftune's PackedSFTDataset (Llama 3 tokenizer), through sftune's
own build_module and train_step, once in bf16 and once per FP8 recipe, one after the other in one
process. Every run starts from the same weights and sees the same batches in the same order,
so the curves differ only by the FP8 matmuls. Writes the per-step losses (<out>/fp8_parity.json)
and the curves (<out>/fp8_parity.png), and prints each run's mean loss over the last 20 steps
and its relative difference from bf16.

    # one H200 (`benchmarks/gpu.sh fp8parity`); 300 steps x 3 runs take about 16 minutes:
    python benchmarks/fp8_parity.py --data ../shared/data/gsm8k/train.jsonl --steps 300 \
        --out runs/fp8parity
    # shorter: fewer steps, or fewer layers (each layer keeps the 8B's GEMM shapes):
    python benchmarks/fp8_parity.py --data ../shared/data/gsm8k/train.jsonl --steps 80
    python benchmarks/fp8_parity.py --data ../shared/data/gsm8k/train.jsonl --steps 300 --layers 8
    # one recipe per invocation (where a machine's time limit is shorter than all three runs):
    # the same --out and setting keep the other recipes' runs, and the summary covers them all
    for r in off tensorwise rowwise; do python benchmarks/fp8_parity.py --recipes $r; done
    # how far bf16 itself moves: the same data from another init (compare with seed 0)
    python benchmarks/fp8_parity.py --recipes off --seed 1 --out runs/fp8parity-seed1
    # CPU smoke test of the harness (FP8 needs a GPU, so bf16 only, a small shape):
    python benchmarks/fp8_parity.py --data ../shared/data/gsm8k/train.jsonl --device cpu \
        --config smollm2-135m --layers 2 --recipes off --steps 20 --seq 128 --batch 4 \
        --micro-batch 2 --compile off --out /tmp/fp8parity-cpu

The tokenizer is read from --tokenizer DIR (default runs/llama3-tokenizer); when DIR holds none,
it is built there from the `llama-models` package (pip install llama-models==0.3.0 tiktoken),
so a machine without those packages can be given the built directory instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from course_loop import CONFIGS, build_model, make_config  # noqa: E402
from sftune import config as config_mod  # noqa: E402
from sftune.data import PackedSFTDataset  # noqa: E402
from sftune.data.formats import parse_fields  # noqa: E402
from sftune.data.sampler import StepSampler  # noqa: E402
from sftune.llama3_tokenizer import build_llama3_tokenizer  # noqa: E402
from sftune.train import module, step  # noqa: E402
from sftune.train.distributed import World  # noqa: E402
from sftune.train.evaluate import evaluate  # noqa: E402
from sftune.train.optim import build_optimizer  # noqa: E402

FINAL = 20  # the steps whose mean loss is compared
NAMES = {"off": "bf16", "tensorwise": "FP8 tensorwise", "rowwise": "FP8 rowwise"}


def train_run(args, recipe: str, dataset, val_dataset, vocab: int, device) -> dict:
    """One run: the model from seed `args.seed`, `args.steps` optimizer steps; per-step losses,
    and the held-out loss every `args.val_every` steps and at the end (when there is a val set)."""
    cfg = config_mod.from_flat(
        dict(
            seq_length=args.seq,
            batch_size=args.batch,
            micro_batch_size=args.micro_batch,
            lr=args.lr,
            warmup_ratio=args.warmup_ratio,
            max_steps=args.steps,
            fp8=recipe,
            fp8_linears=args.fp8_linears,
            compile=args.compile,
            fused_loss="on",
            device=device.type,
            seed=args.seed,
        )
    )
    mcfg = make_config(args.config)
    mcfg.vocab_size = max(mcfg.vocab_size, vocab)
    if args.layers:
        mcfg.num_hidden_layers = args.layers
    model = build_model(mcfg, device, args.dtype, seed=args.seed)
    built = module.build_module(cfg, model, device, World())
    optimizer, scheduler = build_optimizer(
        list(built.module.parameters()), cfg.optim, args.steps, device
    )
    sampler = StepSampler(len(dataset), args.batch, shuffle=True, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, norms, val = [], [], []
    start = time.perf_counter()
    eval_s = 0.0
    timed_from = None
    for s in range(args.steps):
        if s == min(3, args.steps - 1):  # the first steps compile
            _sync(device)
            timed_from = (s, time.perf_counter())
        batches = step.micro_batches(
            dataset, sampler.next_indices(), args.micro_batch, device, varlen=False
        )
        loss, norm, _, _ = step.train_step(
            built.module, optimizer, scheduler, batches, grad_clip=cfg.optim.grad_clip
        )
        losses.append(loss.detach().float())
        norms.append(norm.detach().float())
        if val_dataset is not None and ((s + 1) % args.val_every == 0 or s + 1 == args.steps):
            t = time.perf_counter()
            v, _ = evaluate(
                built.module, val_dataset, micro_batch_size=args.micro_batch, device=device
            )
            val.append([s + 1, v])
            print(f"[{NAMES[recipe]}] step {s + 1} held-out loss {v:.4f}", flush=True)
            eval_s += time.perf_counter() - t
        if (s + 1) % args.log_every == 0 or s + 1 == args.steps:
            print(
                f"[{NAMES[recipe]}] step {s + 1}/{args.steps} loss {float(loss):.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    _sync(device)
    end = time.perf_counter()
    timed_steps = args.steps - timed_from[0]
    result = dict(
        recipe=recipe,
        losses=torch.stack(losses).tolist(),
        grad_norms=torch.stack(norms).tolist(),
        val_losses=val,
        tokens_per_s=args.batch * args.seq * timed_steps / max(end - timed_from[1] - eval_s, 1e-9),
        wall_s=end - start,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0,
        notes=list(built.notes),
    )
    del model, built, optimizer, scheduler
    _free(device)
    return result


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def final_mean(losses: list[float], n: int = FINAL) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def summarize(runs: dict[str, dict]) -> list[str]:
    """One line per run: final mean loss, its relative difference from bf16, the final held-out
    loss and its difference, the speed."""
    base = runs.get("off")
    lines = [
        f"final {FINAL}-step mean train loss (relative to bf16), final held-out loss "
        "(relative to bf16), tokens/s, peak memory:"
    ]
    for recipe, res in runs.items():
        mean = final_mean(res["losses"])
        res[f"final{FINAL}_mean"] = mean
        held = res.get("val_losses") or []
        rel = rel_val = ""
        if base is not None and recipe != "off":
            res["rel_diff_vs_bf16"] = (mean - final_mean(base["losses"])) / final_mean(
                base["losses"]
            )
            within = "within" if abs(res["rel_diff_vs_bf16"]) <= 0.01 else "NOT within"
            rel = f" ({100 * res['rel_diff_vs_bf16']:+.2f}%, {within} 1%)"
            if held and base.get("val_losses"):
                res["val_rel_diff_vs_bf16"] = held[-1][1] / base["val_losses"][-1][1] - 1
                rel_val = f" ({100 * res['val_rel_diff_vs_bf16']:+.2f}%)"
        val = f"  held-out {held[-1][1]:.4f}{rel_val}" if held else ""
        lines.append(
            f"  {NAMES[recipe]:>15}: {mean:.4f}{rel}{val}  {res['tokens_per_s']:,.0f} tokens/s  "
            f"peak {res['peak_gib']:.1f} GiB"
        )
    return lines


def plot(runs: dict[str, dict], out: Path, title: str) -> None:
    """Losses per step (raw, thin; 10-step moving average, thick) and each FP8 run's smoothed
    difference from bf16."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    colors = {"off": "tab:blue", "tensorwise": "tab:orange", "rowwise": "tab:green"}
    smooth = {r: _moving_average(res["losses"], 10) for r, res in runs.items()}
    for recipe, res in runs.items():
        steps = range(1, len(res["losses"]) + 1)
        c = colors[recipe]
        top.plot(steps, res["losses"], color=c, alpha=0.25, linewidth=0.7)
        top.plot(steps, smooth[recipe], color=c, linewidth=1.6, label=NAMES[recipe])
        if held := res.get("val_losses"):
            top.plot(
                *zip(*held, strict=True),
                color=c,
                linestyle="--",
                marker="o",
                markersize=4,
                linewidth=1.0,
                label=f"{NAMES[recipe]}, held-out",
            )
        if recipe != "off" and "off" in runs:
            diff = [a - b for a, b in zip(smooth[recipe], smooth["off"], strict=True)]
            bottom.plot(steps, diff, color=c, linewidth=1.4, label=f"{NAMES[recipe]} - bf16")
    top.set_ylabel("loss (solid: train; dashed: held-out)")
    top.legend(loc="upper right")
    top.grid(True, alpha=0.3)
    bottom.axhline(0.0, color="tab:blue", linewidth=0.8)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("loss - bf16 (10-step mean)")
    if len(runs) > 1:
        bottom.legend(loc="upper right", fontsize="small")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.savefig(out, format="png", dpi=120)


def _moving_average(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


# What must match for runs of separate invocations to be compared (not --recipes, --out, ...).
SETTING = (
    "data", "val_data", "val_every", "fields", "config", "layers", "steps", "seq", "batch", "micro_batch", "lr",
    "warmup_ratio", "fp8_linears", "compile", "device", "seed",
)  # fmt: skip


def earlier_runs(json_path: Path, args: dict[str, str], recipes: list[str]) -> dict[str, dict]:
    """The runs an earlier invocation wrote to `json_path` for the recipes not asked for now,
    when its setting was this one (so that one recipe per invocation adds up to the comparison);
    a file of another setting is refused, never overwritten."""
    if not json_path.is_file():
        return {}
    earlier = json.loads(json_path.read_text())
    differ = [k for k in SETTING if earlier.get("args", {}).get(k) != args[k]]
    if differ:
        raise SystemExit(
            f"{json_path} holds runs of another setting ({', '.join(differ)} differ): "
            "choose another --out"
        )
    kept = {r: run for r, run in earlier.get("runs", {}).items() if r not in recipes}
    if kept:
        print(f"kept from {json_path}: {', '.join(NAMES[r] for r in kept)}", flush=True)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="../shared/data/gsm8k/train.jsonl", help="GSM8K train")
    ap.add_argument(
        "--val-data", default="../shared/data/gsm8k/test.jsonl", help="held-out; '' for none"
    )
    ap.add_argument("--val-every", type=int, default=100, help="steps between held-out losses")
    ap.add_argument("--fields", default="question=prompt,answer=response")
    ap.add_argument("--tokenizer", default="runs/llama3-tokenizer", help="built here if absent")
    ap.add_argument("--config", default="llama3.1-8b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the config's)")
    ap.add_argument("--recipes", default="off,tensorwise,rowwise", help="off is bf16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4, help="peak; warmup then cosine to 0")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--fp8-linears", default="all", choices=["all", "auto"])
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--seed", type=int, default=0, help="the init's; the data order stays (a bf16 noise band)"
    )
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("runs/fp8parity"))
    args = ap.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    if unknown := [r for r in recipes if r not in NAMES]:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {', '.join(NAMES)}")
    if args.steps < FINAL:
        raise SystemExit(f"--steps must be at least {FINAL}: the final {FINAL} are compared")
    device = torch.device(args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_llama3_tokenizer(args.tokenizer)
    dataset = PackedSFTDataset(
        tokenizer, args.data, args.seq, True, seed=0, fields=parse_fields(args.fields)
    )
    val_dataset = None
    if args.val_data:
        val_dataset = PackedSFTDataset(
            tokenizer, args.val_data, args.seq, False, fields=parse_fields(args.fields)
        )
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "layers": args.layers or make_config(args.config).num_hidden_layers,
        "args": {k: str(v) for k, v in vars(args).items()},
        "sequences": len(dataset),
        "val_sequences": len(val_dataset) if val_dataset is not None else 0,
        "runs": {},
    }
    json_path, png_path = args.out / "fp8_parity.json", args.out / "fp8_parity.png"
    results["runs"] = earlier_runs(json_path, results["args"], recipes)
    for recipe in recipes:
        results["runs"][recipe] = train_run(
            args, recipe, dataset, val_dataset, len(tokenizer), device
        )
        json_path.write_text(json.dumps(results, indent=1))  # kept if a later run fails
    results["runs"] = {r: results["runs"][r] for r in NAMES if r in results["runs"]}
    lines = summarize(results["runs"])
    print("\n".join(lines))
    json_path.write_text(json.dumps(results, indent=1))
    title = (
        f"{args.config}, {results['layers']} layers, random init: GSM8K (Alpaca), "
        f"{args.batch} x {args.seq} tokens, lr {args.lr:g}"
    )
    plot(results["runs"], png_path, title)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
