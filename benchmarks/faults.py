"""CPU costs of the fault and hostile-input guards: checkpoint manifests and one huge record.

    python benchmarks/faults.py manifest record --out runs/bench/faults.json

  manifest  SHA-256 manifest of a checkpoint-sized file (--manifest-mb, default 540: SmolLM2's
            model.safetensors): writing it (`files.write_manifest`), verifying sizes only and
            verifying contents (`files.verify_manifest`), each the best of --repeat
  record    `sftune prepare` of a file holding one prompt/response record of each --record-mb
            size (SmolLM2's tokenizer, 512-token items, a fresh cache): wall time and the peak
            resident memory of the process; a record over MAX_RECORD_BYTES (8 MiB) is refused,
            which is timed too

Each part prints a table and the JSON goes to --out. Nothing here is part of `make test`.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sftune.files import verify_manifest, write_manifest  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def manifest(size_mb: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with (root / "model.safetensors").open("wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
        write = best(lambda: write_manifest(root), repeat)
        sizes = best(lambda: verify_manifest(root, contents=False), repeat)
        contents = best(lambda: verify_manifest(root, contents=True), repeat)
    row = {"mb": size_mb, "write_s": write, "verify_sizes_s": sizes, "verify_contents_s": contents}
    row["gb_per_s"] = size_mb * 2**20 / contents / 1e9
    print(
        f"manifest of {size_mb} MB: write {write:.2f} s, verify sizes {sizes * 1e3:.2f} ms, "
        f"verify contents {contents:.2f} s ({row['gb_per_s']:.2f} GB/s)"
    )
    return row


def record(size_mb: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "one.jsonl"
        half = int(size_mb * 2**20 / 2 / 5)  # "word " is 5 bytes
        data.write_text(json.dumps({"prompt": "word " * half, "response": "text " * half}) + "\n")
        env = {**os.environ, "SFTUNE_CACHE_DIR": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "sftune", "prepare", str(data), "--tokenizer"]
        cmd += ["smollm2-135m", "--seq-length", "512"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size_mb = data.stat().st_size / 2**20
    # ru_maxrss of children is the largest child so far: grow sizes upward for a true peak.
    row = {
        "record_mb": round(size_mb, 2),
        "rc": done.returncode,
        "wall_s": seconds,
        "peak_rss_mb": max(peak, before) / 1024,
        "message": (done.stderr.strip().splitlines() or [""])[-1][:160],
    }
    print(
        f"record of {row['record_mb']} MB: rc {row['rc']}, {seconds:.1f} s, "
        f"peak {row['peak_rss_mb']:.0f} MB | {row['message'] if row['rc'] else 'packed'}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=("manifest", "record"))
    parser.add_argument("--manifest-mb", type=int, default=540)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record-mb", default="1,5,20", help="comma-separated sizes, ascending")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    if "manifest" in args.parts:
        results["manifest"] = manifest(args.manifest_mb, args.repeat)
    if "record" in args.parts:
        results["record"] = [record(float(mb)) for mb in args.record_mb.split(",")]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
