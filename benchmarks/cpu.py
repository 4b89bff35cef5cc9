"""CPU timings of the real commands: the demo run, its training steps at other shapes, the tests.

    python benchmarks/cpu.py demo steps test --out runs/bench/cpu.json

Each part runs sftune's command line (or pytest) from this checkout in a subprocess, as a user
would, with a fresh model cache of its own:

  demo   `sftune train --config configs/demo.yaml` (what `make demo` runs) twice: with the empty
         cache (the SmolLM2 preset's GGUF is converted on first use) and again with it filled;
         wall time, and the validation loss before and after
  steps  the demo's config for 4 steps at each --shapes micro-batch x length; the trainer's own
         tokens/s from metrics.jsonl (the best step after the first)
  test   `python -m pytest -q tests`: wall time and pytest's summary line

`make demo` and `make test` on a fresh clone also create .venv and install; time them there:
`/usr/bin/time make demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "sftune", "train", "--config", "configs/demo.yaml"]


def run(command: list[str], env: dict[str, str], check: bool = True) -> tuple[float, str]:
    """(wall seconds, output) of a command run in the repository root; exits if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and done.returncode:
        print(done.stdout + done.stderr, file=sys.stderr)
        raise SystemExit(f"cpu.py: {' '.join(command)} failed (exit {done.returncode})")
    return seconds, done.stdout + done.stderr


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def time_demo(env: dict[str, str], tmp: Path) -> dict:
    """The demo's training command, first with the empty model cache, then with it filled."""
    result = {}
    for name in ("first_use", "cached"):
        seconds, _ = run([*TRAIN, "--output-dir", str(tmp / f"demo_{name}")], env)
        val = [round(m["val_loss"], 4) for m in metrics(tmp / f"demo_{name}") if "val_loss" in m]
        result[name] = {"wall_s": round(seconds, 1), "val_loss": [val[0], val[-1]]}
        print(f"demo ({name.replace('_', ' ')}): {seconds:.0f} s, val loss {val[0]} -> {val[-1]}")
    return result


def time_steps(env: dict[str, str], tmp: Path, shapes: list[str]) -> list[dict]:
    """Tokens/s of the trainer's steps at micro-batch x length shapes such as 2x256."""
    rows = []
    for shape in shapes:
        micro, length = shape.split("x")
        out = tmp / f"steps_{shape}"
        flags = ["--max-steps", "4", "--log-every", "1", "--num-samples", "0"]
        flags += ["--batch-size", micro, "--micro-batch-size", micro, "--seq-length", length]
        run([*TRAIN, *flags, "--output-dir", str(out)], env)
        rates = [m["tokens_per_s"] for m in metrics(out) if "tokens_per_s" in m][1:]
        best = max(rates)
        rows.append({"shape": shape, "tokens_per_s": round(best, 1)})
        print(f"steps {shape}: {best:,.0f} tokens/s, {int(micro) * int(length) / best:.1f} s/step")
    return rows


def time_tests(env: dict[str, str]) -> dict:
    """The suite's wall time and pytest's summary line, whether or not every test passes."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    seconds, output = run(command, env, check=False)
    summary = output.strip().splitlines()[-1]
    print(f"tests: {seconds:.0f} s, {summary}")
    return {"wall_s": round(seconds, 1), "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("parts", nargs="*", choices=["demo", "steps", "test"], default=["demo"])
    ap.add_argument("--shapes", nargs="+", default=["1x128", "4x128", "2x512"])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results: dict = {"machine": f"{os.cpu_count()}-core CPU, {sys.platform}"}
    with tempfile.TemporaryDirectory(prefix="sftune-cpu-bench-") as tmp:
        env = dict(os.environ, SFTUNE_CACHE_DIR=str(Path(tmp) / "cache"), HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
        )
        if "demo" in args.parts:
            results["demo"] = time_demo(env, Path(tmp))
        if "steps" in args.parts:
            results["steps"] = time_steps(env, Path(tmp), args.shapes)
        if "test" in args.parts:
            results["test"] = time_tests(env)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
