"""Iterative RPO's first iteration on GSM8K (issue 25, docs/RESULTS.md): from the SmolLM2 SFT
model, sample answers to GSM8K train questions, pair a right one with a wrong one, train DPO
with and without the chosen answer's NLL, and score every model on the full GSM8K test set.

    # on one H200, after the SFT run (`benchmarks/gpu.sh gsm8k_dpo` does both, from nothing):
    python benchmarks/gsm8k_dpo.py --gsm8k ../shared/data/gsm8k \\
        --sft runs/bench/X/smollm2_lr1e-4/final --out runs/bench/X/gsm8k_dpo
    # CPU smoke test of the pipeline (any small SFT'd final/, a handful of prompts and steps):
    python benchmarks/gsm8k_dpo.py --gsm8k D --sft RUN/final --out /tmp/dpo --prompts 6 \
        --val-prompts 2 --samples 2 --max-new-tokens 24 --gen-batch 4 --eval-limit 2 \
        --dtype fp32 --train-dtype fp32 --seq-length 512 --batch-size 1 --max-steps 2

The stages, each an ordinary sftune command (their output in <out>/logs/), with their times:

1. `sftune eval --tasks gsm8k` of the SFT model (lm-eval, all 1,319 test problems), in the
   background while the next stage runs;
2. `sftune generate --data` on the first --val-prompts + --prompts GSM8K *train* questions,
   --samples answers each (temperature 0.8), in --gen-shards processes side by side on the GPU
   (decoding a 135M model is bound by kernel launches, not by the GPU, so two processes take
   about the time of one), --gen-waves parts each, one after the other; a wave that would not
   end --reserve-s before the deadline is not started (fewer pairs rather than no DPO run);
3. `scripts/gsm8k_pairs.py`: chosen a correct sample (or the gold answer when none is),
   rejected a wrong one; the first --val-prompts questions give the held-out pairs, the next
   --prompts the training pairs (all train questions: the test set never builds pairs);
4. `sftune train --objective dpo` once per --runs entry (rpo: --nll-weight 1, as Iterative RPO;
   dpo: plain DPO), the runs side by side on the GPU, pairs of up to 1,024 tokens (none is cut);
5. `sftune eval --tasks gsm8k` of each DPO model, each right after its training.

The report folder (--report, default --out) gets few, small files, rewritten after every stage
so that a run cut short still says what it measured: gsm8k_dpo.json (accuracies with their
standard errors, the runs' validation losses and reward accuracies from metrics.jsonl, pair
counts, how many samples were right, each stage's seconds, the stages that failed),
gsm8k_dpo.png (reward accuracy and margin of every run against the step) and each run's
learning_curve_<run>.png. The models, samples and pairs stay in --out.

Stages can be skipped (--skip, or GSM8K_DPO_SKIP: sft-eval, generate, train, eval; a skipped
generate or train reuses what --out already holds), and GSM8K_DPO_DEADLINE (a Unix time) stops
whatever still runs at that moment, so that a device call with a hard limit ends with its
report written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sftune.train.metrics import read_metrics  # noqa: E402

STAGES = ("sft-eval", "generate", "train", "eval")
FIELDS = "question=prompt,answer=response"
RUNS = {"rpo": 1.0, "dpo": 0.0}  # name -> --nll-weight
METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def _pairs_script():
    """scripts/gsm8k_pairs.py as a module (it is a standalone script, not part of sftune)."""
    spec = importlib.util.spec_from_file_location("gsm8k_pairs", ROOT / "scripts/gsm8k_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Report:
    """gsm8k_dpo.json, rewritten (atomically) whenever a stage finishes; thread-safe."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.path = folder / "gsm8k_dpo.json"
        self.data: dict = {
            "settings": settings,
            "seconds": {},
            "pairs": {},
            "accuracy": {},
            "runs": {},
            "failed": [],  # the stages that failed or were stopped
        }
        self.lock = threading.Lock()
        self.start = time.time()
        self.save()

    def update(self, key: str, name: str, value) -> None:
        with self.lock:
            self.data[key][name] = value
            self.data["seconds"]["total"] = round(time.time() - self.start, 1)
            self.save()

    def failed(self, name: str) -> None:
        with self.lock:
            self.data["failed"].append(name)
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def run(name: str, command: list[str], logs: Path, report: Report) -> bool:
    """One stage's command, its output to logs/<name>.log; its time into the report. A failure
    (or the deadline) prints the log's tail and returns False."""
    deadline = float(os.environ.get("GSM8K_DPO_DEADLINE") or 0)
    timeout = deadline - time.time() if deadline else None
    if timeout is not None and timeout < 5:
        say(f"== {name}: not started, the deadline has passed")
        report.failed(name)
        return False
    say(f"== {name}: {' '.join(command)}")
    start = time.time()
    with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # sftune train saves a checkpoint on SIGTERM
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            code = f"stopped at the deadline ({code})"
    seconds = round(time.time() - start, 1)
    report.update("seconds", name, seconds)
    say(f"== {name}: {'done' if code == 0 else f'FAILED ({code})'} in {seconds} s")
    if code != 0:
        report.failed(name)
        say((logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:])
    return code == 0


def say(text: str) -> None:
    """One write per line: the stages' threads print side by side."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def sftune(*args: str) -> list[str]:
    return [sys.executable, "-m", "sftune", *args]


# ----------------------------------------------------------------------------- the stages


def evaluate(name: str, model: str, args, report: Report, skip: bool = False) -> None:
    """GSM8K through lm-eval, as `benchmarks/gpu.sh gsm8k` scores its models (`skip`: only
    what an earlier run in --out measured)."""
    out = args.out / f"eval_{name}"
    if not skip:
        _evaluate(name, model, out, args, report)
    if not (out / "eval_results.json").is_file():
        return
    result = json.loads((out / "eval_results.json").read_text())["results"]["gsm8k"]
    accuracy = {"problems": result.get("sample_len")}
    for metric in METRICS:
        kind = metric.split(",")[1]
        accuracy[kind] = result[metric]
        accuracy[f"{kind}_stderr"] = result[metric.replace(",", "_stderr,")]
    report.update("accuracy", name, accuracy)


def _evaluate(name: str, model: str, out: Path, args, report: Report) -> None:
    shutil.rmtree(out, ignore_errors=True)  # no earlier result read as this one's
    command = sftune(
        "eval", "--model", model, "--tasks", "gsm8k",
        "--task-data", f"gsm8k={args.gsm8k / 'test.jsonl'}",
        "--dtype", args.dtype, "--batch-size", str(args.eval_batch), "--log-samples",
        "--output-dir", str(out),
    )  # fmt: skip
    if args.eval_limit:
        command += ["--limit", str(args.eval_limit)]
    run(f"eval_{name}", command, args.logs, report)


def prompt_files(args) -> list[Path]:
    """The first --val-prompts + --prompts GSM8K train records (the held-out ones first, so
    that the first wave holds them), in --gen-shards x --gen-waves files."""
    total = args.val_prompts + args.prompts
    with open(args.gsm8k / "train.jsonl", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:total]
    if len(lines) < total:
        raise SystemExit(
            f"gsm8k_dpo: {args.gsm8k}/train.jsonl has {len(lines)} records, not {total}"
        )
    per = math.ceil(total / (args.gen_shards * args.gen_waves))
    files = []
    for i in range(0, total, per):
        path = args.out / f"gsm8k_train_part{len(files)}.jsonl"
        path.write_text("".join(lines[i : i + per]), encoding="utf-8")
        files.append(path)
    return files


def generate_part(i: int, data: Path, args, report: Report) -> bool:
    """`sftune generate` of one part, in even batches of at most --gen-batch rows."""
    rows = args.samples * len(data.read_text(encoding="utf-8").splitlines())
    batch = math.ceil(rows / math.ceil(rows / args.gen_batch))  # no short last batch
    out = args.out / f"samples_part{i}.jsonl"
    out.unlink(missing_ok=True)
    command = sftune(
        "generate", "--model", str(args.sft), "--data", str(data), "--fields", FIELDS,
        "--num-samples", str(args.samples), "--temperature", str(args.temperature),
        "--top-p", str(args.top_p), "--max-new-tokens", str(args.max_new_tokens),
        "--batch-size", str(batch), "--seed", str(i), "--dtype", args.dtype, "--out", str(out),
    )  # fmt: skip
    return run(f"generate_part{i}", command, args.logs, report)


def generate(args, report: Report) -> Path | None:
    """samples.jsonl, the parts' samples in the records' order (None if the first wave
    failed). The parts run --gen-shards at a time; a further wave starts only if, at the pace
    of the earlier ones, it ends --reserve-s before GSM8K_DPO_DEADLINE: fewer questions,
    rather than no DPO run at all."""
    samples = args.out / "samples.jsonl"
    if "generate" in args.skip or samples.exists():
        return samples if samples.exists() else None
    parts = prompt_files(args)
    deadline = float(os.environ.get("GSM8K_DPO_DEADLINE") or 0)
    start, done = time.time(), []
    for first in range(0, len(parts), args.gen_shards):
        pace = (time.time() - start) / (first // args.gen_shards or 1)
        if first and deadline and time.time() + pace > deadline - args.reserve_s:
            say(f"== generate: {len(done)} of {len(parts)} parts, no time for more")
            break
        wave = range(first, min(first + args.gen_shards, len(parts)))
        with ThreadPoolExecutor(len(wave)) as pool:
            ok = list(pool.map(lambda i: generate_part(i, parts[i], args, report), wave))
        if not all(ok):
            break
        done += list(wave)
    if not done:
        return None
    with open(samples.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        for i in done:
            f.write((args.out / f"samples_part{i}.jsonl").read_text(encoding="utf-8"))
    os.replace(samples.with_suffix(".tmp"), samples)
    return samples


def build_pairs(samples: Path, args, report: Report) -> tuple[Path, Path]:
    """pairs_val.jsonl (the first --val-prompts questions) and pairs_train.jsonl (the rest),
    with their counts and how often a sample was right."""
    pairs = _pairs_script()
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    counts: dict = {}
    files = {}
    for split, chunk in (("val", rows[: args.val_prompts]), ("train", rows[args.val_prompts :])):
        src, out = args.out / f"samples_{split}.jsonl", args.out / f"pairs_{split}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in chunk), encoding="utf-8")
        out.unlink(missing_ok=True)
        counts[split] = pairs.build(src, out)
        outputs = [(s, r["answer"]) for r in chunk for s in r["outputs"]]
        right = sum(pairs.final_answer(s) == pairs.final_answer(gold) for s, gold in outputs)
        counts[split]["samples"] = len(outputs)
        counts[split]["samples_correct"] = right
        counts[split]["samples_with_answer_line"] = sum(
            pairs.final_answer(s) is not None for s, _ in outputs
        )
        files[split] = out
    for split, value in counts.items():
        report.update("pairs", split, value)
    say(f"== pairs: {json.dumps(counts)}")
    return files["train"], files["val"]


def train(name: str, nll_weight: float, train_pairs: Path, val_pairs: Path, args, report) -> bool:
    """One DPO run from the SFT model; its metrics and curve into the report."""
    run_dir = args.out / f"dpo_{name}"
    if "train" not in args.skip:
        shutil.rmtree(run_dir, ignore_errors=True)
        command = sftune(
            "train", "--objective", "dpo", "--model", str(args.sft),
            "--train-data", str(train_pairs), "--val-data", str(val_pairs),
            "--beta", str(args.beta), "--lr", str(args.lr), "--epochs", str(args.epochs),
            "--seq-length", str(args.seq_length), "--batch-size", str(args.batch_size),
            # One forward for the whole step, no probe: the probe would read the memory of the
            # processes beside it on the GPU.
            "--micro-batch-size", str(args.batch_size),
            "--truncation", "keep-start", "--warmup-ratio", "0.1", "--dtype", args.train_dtype,
            "--eval-every", str(args.eval_every), "--log-every", "5", "--num-samples", "0",
            "--output-dir", str(run_dir),
        )  # fmt: skip
        if nll_weight:
            command += ["--nll-weight", str(nll_weight)]
        if args.max_steps:
            command += ["--max-steps", str(args.max_steps)]
        if not run(f"train_{name}", command, args.logs, report):
            return False
    log = args.logs / f"train_{name}.log"
    packed = [  # the build's summary lines: rows, padding, pairs cut
        line
        for line in (log.read_text(encoding="utf-8").splitlines() if log.exists() else [])
        if line.startswith(("sftune: pairs_", "sftune: reference log-probs"))
    ]
    summary = {"nll_weight": nll_weight, "data": packed, **run_summary(run_dir)}
    report.update("runs", name, summary)
    curve = run_dir / "learning_curve.png"
    if curve.exists():
        shutil.copyfile(curve, args.report / f"learning_curve_{name}.png")
    return (run_dir / "final").is_dir()


def run_summary(run_dir: Path) -> dict:
    """What a DPO run's metrics.jsonl says: the validation rows (loss, reward accuracy and
    margin) and the first and last train rows (does the chosen answers' log-prob fall?)."""
    rows = read_metrics(run_dir)
    val_keys = ("step", "val_loss", "val_rewards/accuracies", "val_rewards/margins")
    val = [{k: r.get(k) for k in val_keys} for r in rows if "val_loss" in r]
    train_rows = [r for r in rows if "train_loss" in r]
    keys = ("step", "train_loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "pairs")  # fmt: skip
    ends = {"first_train": train_rows[:1], "last_train": train_rows[-1:]}
    return {"val": val, **{e: {k: r[0].get(k) for k in keys} if r else {} for e, r in ends.items()}}


def plot_rewards(runs: dict[str, Path], out: Path) -> None:
    """gsm8k_dpo.png: each DPO run's reward accuracy (train and held-out) and held-out margin
    against the optimizer step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    acc, margin = fig.subplots(1, 2)
    for (name, run_dir), color in zip(runs.items(), ("C0", "C1", "C2"), strict=False):
        rows = read_metrics(run_dir)
        train_rows = [r for r in rows if r.get("rewards/accuracies") is not None]
        val = [r for r in rows if r.get("val_rewards/accuracies") is not None]
        steps = [r["step"] for r in train_rows]
        acc.plot(steps, [r["rewards/accuracies"] for r in train_rows], color=color, alpha=0.35,
                 lw=1, label=f"{name} train")  # fmt: skip
        acc.plot([r["step"] for r in val], [r["val_rewards/accuracies"] for r in val], "o-",
                 color=color, label=f"{name} held-out")  # fmt: skip
        margin.plot([r["step"] for r in val], [r["val_rewards/margins"] for r in val], "o-",
                    color=color, label=f"{name} held-out")  # fmt: skip
    acc.set(xlabel="optimizer step", ylabel="reward accuracy", ylim=(-0.02, 1.02))
    margin.set(xlabel="optimizer step", ylabel="reward margin (chosen - rejected)")
    for ax in (acc, margin):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DPO on GSM8K pairs from the SmolLM2 SFT model's own samples")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def sft_summary(sft: Path) -> dict:
    """The SFT run's validation losses (GSM8K test), when its run directory is there."""
    rows = read_metrics(sft.parent) if (sft.parent / "metrics.jsonl").exists() else []
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"val_loss_first": val[0], "val_loss_last": val[-1]} if val else {}


def chain(name: str, nll: float, pairs: tuple[Path, Path], args, report: Report) -> None:
    if train(name, nll, *pairs, args, report):
        evaluate(name, str(args.out / f"dpo_{name}" / "final"), args, report, "eval" in args.skip)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.logs = args.out / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    args.report.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["skip"] = sorted(args.skip)
    report = Report(args.report, settings)
    report.update("runs", "sft", sft_summary(args.sft))
    if args.sft_seconds is not None:
        report.update("seconds", "sft_train", args.sft_seconds)
    background = []
    skip = bool({"sft-eval", "eval"} & args.skip)
    sft_eval = threading.Thread(target=evaluate, args=("sft", str(args.sft), args, report, skip))
    sft_eval.start()
    background.append(sft_eval)
    start = time.time()
    samples = generate(args, report)
    report.update("seconds", "generate", round(time.time() - start, 1))
    if samples is not None:
        pairs = build_pairs(samples, args, report)
        for name in args.runs:
            thread = threading.Thread(target=chain, args=(name, RUNS[name], pairs, args, report))
            thread.start()
            background.append(thread)
    for thread in background:
        thread.join()
    trained = {n: args.out / f"dpo_{n}" for n in args.runs if n in report.data["runs"]}
    if trained:
        plot_rewards(trained, args.report / "gsm8k_dpo.png")
    report.update("seconds", "total", round(time.time() - report.start, 1))
    say(f"== gsm8k_dpo: report in {report.path}")
    return 0 if samples is not None and not report.data["failed"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gsm8k", type=Path, required=True, help="holds train.jsonl and test.jsonl")
    ap.add_argument("--sft", type=Path, required=True, help="the SFT model (a run's final/)")
    ap.add_argument("--out", type=Path, required=True, help="models, samples, pairs, logs")
    ap.add_argument("--report", type=Path, default=None, help="the few small result files")
    ap.add_argument("--sft-seconds", type=float, default=None, help="the SFT run's, if known")
    add = ap.add_argument_group("sampling").add_argument
    add("--prompts", type=int, default=2000, help="train questions that build training pairs")
    add("--val-prompts", type=int, default=200, help="the next ones: held-out pairs")
    add("--samples", type=int, default=4, help="answers per question")
    add("--temperature", type=float, default=0.8)
    add("--top-p", type=float, default=1.0)
    add("--max-new-tokens", type=int, default=256, help="as lm-eval's GSM8K cap")
    add("--gen-batch", type=int, default=1152, help="at most this many rows per batch")
    add("--gen-shards", type=int, default=2, help="generate processes side by side")
    add("--gen-waves", type=int, default=2, help="parts per process, one after the other")
    add("--reserve-s", type=float, default=240, help="kept for DPO and evaluation")
    add("--dtype", default="bf16", help="of generation and evaluation")
    add = ap.add_argument_group("DPO").add_argument
    add("--runs", default="rpo,dpo", help="rpo (--nll-weight 1) and/or dpo (plain)")
    add("--beta", type=float, default=0.1)
    add("--lr", type=float, default=1e-5)
    add("--epochs", type=float, default=2)
    add("--max-steps", type=int, default=0, help="0: from --epochs")
    add("--seq-length", type=int, default=1024, help="a whole pair fits: no cut")
    add("--batch-size", type=int, default=8, help="rows of --seq-length per step")
    add("--eval-every", type=int, default=20)
    add("--train-dtype", default="bf16-mixed")
    add = ap.add_argument_group("evaluation").add_argument
    add("--eval-batch", type=int, default=256, help="as benchmarks/gpu.sh gsm8k")
    add("--eval-limit", type=int, default=0, help="0: all 1,319 test problems")
    skip = os.environ.get("GSM8K_DPO_SKIP", "")
    ap.add_argument("--skip", default=skip, help=f"comma-separated, of {', '.join(STAGES)}")
    args = ap.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    args.skip = {s for s in args.skip.replace(" ", ",").split(",") if s}
    for bad in [r for r in args.runs if r not in RUNS] + [s for s in args.skip - set(STAGES)]:
        ap.error(f"unknown run or stage {bad!r}")
    counts = (args.prompts, args.val_prompts, args.samples, args.gen_shards, args.gen_waves)
    if min(*counts, args.gen_batch) < 1:
        ap.error("--prompts, --val-prompts, --samples and the --gen-* counts must be >= 1")
    args.report = args.report or args.out
    args.out, args.report = args.out.resolve(), args.report.resolve()
    args.gsm8k, args.sft = args.gsm8k.resolve(), args.sft.resolve()
    return args


if __name__ == "__main__":
    sys.exit(main())
