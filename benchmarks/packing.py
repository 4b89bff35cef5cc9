"""Benchmark PackedSFTDataset at scale: cold build, bare tokenization, cache load, memory, access.

    .venv/bin/python benchmarks/packing.py [--documents 200000] [--seq-length 2048] [--out FILE]

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

Prints a table and, with --out, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's sftune


def make_file(path: Path, documents: int) -> None:
    """The synthetic prompt/response file (see the module docstring)."""
    gsm = _read_jsonl(SHARED / "data/gsm8k/train.jsonl")
    alpaca = _read_jsonl(SHARED / "data/alpaca_eval/alpaca_eval.jsonl")
    with open(path, "w") as f:
        for i in range(documents):
            g, a = gsm[i % len(gsm)], alpaca[(7 * i) % len(alpaca)]
            record = {"prompt": g["question"], "response": f"{g['answer']}\n\n{a['output']}"}
            f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_build(args: argparse.Namespace) -> dict:
    """In a subprocess: build or load the dataset, time it, sample access rates."""
    import numpy as np

    from sftune.data import PackedSFTDataset, iterate_batches
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    tokenizer = build_llama3_tokenizer(args.tokenizer_dir)
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    ds = PackedSFTDataset(tokenizer, args.data, args.seq_length, args.shuffle, verbose=True)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_build_mb": rss_before,
        "from_cache": ds.stats.from_cache,
        "documents": ds.stats.documents,
        "tokens": ds.stats.tokens,
        "items": ds.stats.items,
        "tokens_kept_fraction": ds.stats.tokens_kept_fraction,
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


def run_child(args: argparse.Namespace, shuffle: bool, access: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--data", str(args.data)]
    command += ["--tokenizer-dir", str(args.tokenizer_dir), "--seq-length", str(args.seq_length)]
    command += ["--shuffle"] * shuffle + ["--access"] * access
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
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
    args.data = tmp / "synthetic.jsonl"
    make_file(args.data, args.documents)
    cold = run_child(args, shuffle=False, access=False)
    bare = bare_tokenization(args)
    warm = run_child(args, shuffle=False, access=True)
    warm_shuffled = run_child(args, shuffle=True, access=False)
    return {
        "machine": f"{os.cpu_count()}-core CPU, {sys.platform}",
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
