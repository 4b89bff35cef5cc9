"""Scaling efficiency from the throughput runs of `benchmarks/gpu.sh scaling`.

    python benchmarks/scaling.py runs/bench/<date>          # reads scaling_<model>_<seq>_<gpus>.json

For each model and sequence length: tokens/s, tokens/s per GPU, and the efficiency of N GPUs
against 1 (per-GPU tokens/s at N / at 1; the runs keep the tokens per GPU fixed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"^scaling_(?P<model>[^_]+)_(?P<seq>\d+)_(?P<gpus>\d+)\.json$")


def rows(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("scaling_*.json")):
        m = NAME.match(path.name)
        if not m:
            continue
        result = json.loads(path.read_text())
        for run, res in result["runs"].items():
            out.append(
                dict(
                    model=m["model"],
                    seq=int(m["seq"]),
                    gpus=int(m["gpus"]),
                    run=run,
                    dist=res.get("dist", "?"),
                    tokens_per_s=res.get("tokens_per_s"),
                    error=res.get("error"),
                )
            )
    return out


def table(found: list[dict]) -> str:
    one = {(r["model"], r["seq"]): r["tokens_per_s"] for r in found if r["gpus"] == 1}
    lines = ["model  seq    GPUs  dist   tokens/s   per GPU   efficiency vs 1 GPU"]
    for r in sorted(found, key=lambda r: (r["model"], r["seq"], r["gpus"])):
        if r["tokens_per_s"] is None:
            lines.append(f"{r['model']:6s} {r['seq']:5d} {r['gpus']:5d}  FAILED {r['error']}")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        base = one.get((r["model"], r["seq"]))
        eff = f"{100 * per_gpu / base:6.1f}%" if base else "     -"
        lines.append(
            f"{r['model']:6s} {r['seq']:5d} {r['gpus']:5d}  {r['dist']:5s} "
            f"{r['tokens_per_s']:9,.0f} {per_gpu:9,.0f}   {eff}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows(Path(sys.argv[1] if len(sys.argv) > 1 else "."))))
