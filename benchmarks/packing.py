"""Benchmark PackedSFTDataset at scale: cold build, bare tokenization, cache load, memory, access,
and the cost of masking every assistant turn of multi-turn chats.

    .venv/bin/python benchmarks/packing.py [--documents 200000] [--seq-length 2048] [--out FILE]
                                           [--parts course,chat]

A synthetic file of `--documents` records (default 200,000, about 57M Llama 3 tokens) is made
in a temporary directory from ../shared/data: record i is GSM8K train question i (mod 7,473)
as the prompt, and GSM8K answer i followed by AlpacaEval output 7i (mod 805) as the response.

Measured, each build in its own subprocess so that one pass does not pollute another's peak RSS:

* cold build: `PackedSFTDataset(...)` with an empty cache (hash, read, render, tokenize,
  write the cache, map it back), and the peak RSS of that process;
* bare tokenization: `tokenizer(texts)` over the same rendered texts, in the same batches of
  2,048 documents (one call over all texts would hold ~57M Python ints), and the ratio
  build / bare (target <= 1.2);
* cache load: the same dataset again in a fresh process, in file order and shuffled
  (target <= 2 s);
* random `__getitem__` rate and `iterate_batches` rate.

Chat part: `--documents` OpenAI-messages chats of two exchanges (chat i: a system prompt, GSM8K
question i, its answer, AlpacaEval instruction 7i, its output), Llama 3 tokenizer with the
Llama 3 Instruct chat template and EOS `<|eot_id|>`. Each of `--train-on all` (no mask),
`last` (the final turn only: the conversation as a single response, what `--response-only`
trained before) and `assistant` (both turns, each located by rendering prefixes) is a cold
build in its own subprocess, run `--chat-repeats` times in rotation; the table gives each
mode's fastest build and the ratio assistant / last (target <= 1.5) and assistant / all.

Prints a table and, with --out, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))  # this checkout's sftune
sys.path.insert(0, str(ROOT / "tests"))  # the chat templates the chat tests use
from chat_templates import LLAMA3_INSTRUCT  # noqa: E402  (Meta-Llama-3-8B-Instruct's)

CHAT_MODES = ("all", "last", "assistant")


def _sources(documents: int):
    """(GSM8K train record i mod 7,473, AlpacaEval record 7i mod 805) for each document i."""
    gsm = _read_jsonl(SHARED / "data/gsm8k/train.jsonl")
    alpaca = _read_jsonl(SHARED / "data/alpaca_eval/alpaca_eval.jsonl")
    for i in range(documents):
        yield gsm[i % len(gsm)], alpaca[(7 * i) % len(alpaca)]


def make_file(path: Path, documents: int) -> None:
    """The synthetic prompt/response file (see the module docstring)."""
    with open(path, "w") as f:
        for g, a in _sources(documents):
            record = {"prompt": g["question"], "response": f"{g['answer']}\n\n{a['output']}"}
            f.write(json.dumps(record) + "\n")


def make_chat_file(path: Path, documents: int) -> None:
    """The synthetic two-exchange chats (see the module docstring)."""
    with open(path, "w") as f:
        for g, a in _sources(documents):
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": g["question"]},
                {"role": "assistant", "content": g["answer"]},
                {"role": "user", "content": a["instruction"]},
                {"role": "assistant", "content": a["output"]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (the tokenizer's pool too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_build(args: argparse.Namespace) -> dict:
    """In a subprocess: build or load the dataset, time it, sample access rates."""
    import numpy as np

    from sftune.data import PackedSFTDataset, iterate_batches
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    tokenizer = build_llama3_tokenizer(args.tokenizer_dir)
    if args.train_on != "all":  # the chat part
        tokenizer.chat_template, tokenizer.eos_token = LLAMA3_INSTRUCT, "<|eot_id|>"
    rss_before = _peak_rss_mb()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    ds = PackedSFTDataset(
        tokenizer,
        args.data,
        args.seq_length,
        args.shuffle,
        train_on=args.train_on.removeprefix("chat-"),
        verbose=True,
    )
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_build_mb": rss_before,
        "from_cache": ds.stats.from_cache,
        "documents": ds.stats.documents,
        "tokens": ds.stats.tokens,
        "items": ds.stats.items,
        "tokens_kept_fraction": ds.stats.tokens_kept_fraction,
        "trained_tokens": ds.num_trained_tokens,
        "seq_length": args.seq_length,
    }
    if args.access:
        indices = np.random.default_rng(0).integers(0, len(ds), 20_000)
        start = time.perf_counter()
        for i in indices:
            ds[int(i)]
        result["getitem_per_s"] = len(indices) / (time.perf_counter() - start)
        start = time.perf_counter()
        batches = iterate_batches(ds, 8, shuffle=True, seed=0)
        count = sum(1 for _ in batches)
        result["batches_of_8_per_s"] = count / (time.perf_counter() - start)
    return result


def bare_tokenization(args: argparse.Namespace) -> float:
    """Seconds of `tokenizer(batch)` over the rendered texts, batch by batch (reading untimed)."""
    from sftune.data.formats import iter_records
    from sftune.data.templates import render_record
    from sftune.data.tokenize import DOCS_PER_BATCH
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    tokenizer = build_llama3_tokenizer(args.tokenizer_dir)
    texts = [render_record(r)[1] for r in iter_records(args.data)]
    start = time.perf_counter()
    for lo in range(0, len(texts), DOCS_PER_BATCH):
        tokenizer(texts[lo : lo + DOCS_PER_BATCH])
    return time.perf_counter() - start


def run_child(
    args: argparse.Namespace, shuffle: bool, access: bool, data: Path | None = None, mode="all"
) -> dict:
    command = [sys.executable, __file__, "--child", "--data", str(data or args.data)]
    command += ["--tokenizer-dir", str(args.tokenizer_dir), "--seq-length", str(args.seq_length)]
    command += ["--shuffle"] * shuffle + ["--access"] * access + ["--train-on", mode]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--parts", default="course,chat", help="which parts to run: course, chat (default: both)"
    )
    parser.add_argument(
        "--chat-repeats", type=int, default=2, help="cold builds per --train-on mode (default: 2)"
    )
    parser.add_argument("--train-on", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shuffle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--access", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(args)))
        return
    with tempfile.TemporaryDirectory(prefix="sftune-bench-") as tmp:
        results = benchmark(args, Path(tmp))
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    os.environ["SFTUNE_CACHE_DIR"] = str(tmp / "cache")
    args.tokenizer_dir = tmp / "tokenizer"
    build_llama3_tokenizer(args.tokenizer_dir)
    parts = {p.strip() for p in args.parts.split(",")}
    results = {"machine": f"{os.cpu_count()}-core CPU, {sys.platform}"}
    if "course" in parts:
        results |= course_benchmark(args, tmp)
    if "chat" in parts:
        results |= chat_benchmark(args, tmp)
    return results


def chat_benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    """Cold builds of the chat file per --train-on mode, in rotation; the fastest of each."""
    chats = tmp / "chats.jsonl"
    make_chat_file(chats, args.documents)
    seconds: dict[str, list[float]] = {mode: [] for mode in CHAT_MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in CHAT_MODES}
    builds = {}
    for repeat in range(args.chat_repeats):
        for mode in CHAT_MODES:
            os.environ["SFTUNE_CACHE_DIR"] = str(tmp / f"chat-cache-{mode}-{repeat}")
            builds[mode] = run_child(args, False, False, data=chats, mode=f"chat-{mode}")
            seconds[mode].append(builds[mode]["seconds"])
            cpu[mode].append(builds[mode]["cpu_seconds"])
            shutil.rmtree(tmp / f"chat-cache-{mode}-{repeat}", ignore_errors=True)
    best = {mode: min(times) for mode, times in seconds.items()}
    best_cpu = {mode: min(times) for mode, times in cpu.items()}
    return {
        "chat_documents": builds["all"]["documents"],
        "chat_tokens": builds["all"]["tokens"],
        "chat_file_mb": chats.stat().st_size / 2**20,
        **{f"chat_cold_build_{mode}_s": best[mode] for mode in CHAT_MODES},
        **{f"chat_cold_build_{mode}_cpu_s": best_cpu[mode] for mode in CHAT_MODES},
        **{f"chat_cold_builds_{mode}_s": _listed(seconds[mode]) for mode in CHAT_MODES},
        **{f"chat_trained_fraction_{mode}": _trained_fraction(builds[mode]) for mode in CHAT_MODES},
        "chat_assistant_over_last": best["assistant"] / best["last"],
        "chat_assistant_over_all": best["assistant"] / best["all"],
        "chat_assistant_over_last_cpu": best_cpu["assistant"] / best_cpu["last"],
        "chat_assistant_over_all_cpu": best_cpu["assistant"] / best_cpu["all"],
    }


def _listed(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _trained_fraction(build: dict) -> float:
    return build["trained_tokens"] / (build["items"] * build["seq_length"])


def course_benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    args.data = tmp / "synthetic.jsonl"
    make_file(args.data, args.documents)
    cold = run_child(args, shuffle=False, access=False)
    bare = bare_tokenization(args)
    warm = run_child(args, shuffle=False, access=True)
    warm_shuffled = run_child(args, shuffle=True, access=False)
    return {
        "documents": cold["documents"],
        "tokens": cold["tokens"],
        "seq_length": args.seq_length,
        "items": cold["items"],
        "file_mb": args.data.stat().st_size / 2**20,
        "cold_build_s": cold["seconds"],
        "bare_tokenizer_s": bare,
        "build_over_bare": cold["seconds"] / bare,
        "cold_build_peak_rss_mb": cold["peak_rss_mb"],
        "rss_before_build_mb": cold["rss_before_build_mb"],
        "cache_load_s": warm["seconds"],
        "cache_load_shuffled_s": warm_shuffled["seconds"],
        "cache_load_shuffled_peak_rss_mb": warm_shuffled["peak_rss_mb"],
        "getitem_per_s": warm["getitem_per_s"],
        "batches_of_8_per_s": warm["batches_of_8_per_s"],
    }


def print_table(results: dict) -> None:
    width = max(map(len, results))
    for key, value in results.items():
        shown = (
            f"{value:,.2f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int)
            else value
        )
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
