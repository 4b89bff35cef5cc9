"""Check that the wheels carried in .whl/ complete the GPU device image.

Reads METADATA of every wheel in a folder (default: .whl/), evaluates each
Requires-Dist (markers for CPython 3.12 on x86-64 Linux; extras skipped) and reports
requirements that neither the device image (transcribed below from
/work/.library/device/KINDS.md, image 'cuda', read 2026-11) nor another carried
wheel satisfies. It also flags carried wheels that would shadow a package the image
already has (two versions of a package on sys.path), and dangerous ones (torch,
triton, transformers, ...) outright.

Usage: python benchmarks/check_wheels.py [WHEEL_DIR]   (exit code 1 on a problem)
Runs anywhere; needs only `packaging`.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# Packages of the device image (KINDS.md, "Python packages already there", 2026-11-17).
# Versions only where KINDS.md's "pip list" row gives them (None = present, version unknown).
DEVICE_PACKAGES: dict[str, str | None] = dict.fromkeys(
    [
        "absl-py",
        "accelerate",
        "aiofiles",
        "aiohappyeyeballs",
        "aiohttp",
        "aiosignal",
        "annotated-doc",
        "anyio",
        "attrs",
        "botorch",
        "build",
        "certifi",
        "charset-normalizer",
        "chex",
        "click",
        "cloudpickle",
        "cmake",
        "colorama",
        "contourpy",
        "coverage",
        "cuda-bindings",
        "cuda-core",
        "cuda-pathfinder",
        "cuda-toolkit",
        "cupy-cuda13x",
        "cycler",
        "cython",
        "diffrax",
        "e3nn",
        "einops",
        "equinox",
        "etils",
        "execnet",
        "filelock",
        "flatbuffers",
        "flax",
        "fonttools",
        "formulaic",
        "frozenlist",
        "fsspec",
        "gpytorch",
        "grpcio",
        "h11",
        "h5py",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "humanize",
        "hypothesis",
        "idna",
        "imageio",
        "iniconfig",
        "interface-meta",
        "jax",
        "jax-cuda13-pjrt",
        "jax-cuda13-plugin",
        "jaxlib",
        "jaxtyping",
        "jinja2",
        "joblib",
        "kiwisolver",
        "lazy-loader",
        "lightning",
        "lightning-utilities",
        "linear-operator",
        "lineax",
        "llvmlite",
        "lxml",
        "markdown",
        "markdown-it-py",
        "markupsafe",
        "matplotlib",
        "mdurl",
        "meson",
        "ml-dtypes",
        "mpi4py",
        "mpmath",
        "msgpack",
        "multidict",
        "multipledispatch",
        "mypy-extensions",
        "nanobind",
        "narwhals",
        "networkx",
        "ninja",
        "numba",
        "numba-cuda",
        "numpy",
        "numpyro",
        "nvidia-cublas",
        "nvidia-cuda-cupti",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-runtime",
        "nvidia-cudnn-cu13",
        "nvidia-cufft",
        "nvidia-cufile",
        "nvidia-curand",
        "nvidia-cusolver",
        "nvidia-cusparse",
        "nvidia-cusparselt-cu13",
        "nvidia-ml-py",
        "nvidia-nccl-cu13",
        "nvidia-nvjitlink",
        "nvidia-nvshmem-cu13",
        "nvidia-nvtx",
        "onnx",
        "onnx-ir",
        "onnxruntime",
        "onnxscript",
        "opencv-python-headless",
        "optax",
        "opt-einsum",
        "opt-einsum-fx",
        "optimistix",
        "orbax-checkpoint",
        "packaging",
        "pandas",
        "pathspec",
        "patsy",
        "peft",
        "pillow",
        "pip",
        "pluggy",
        "portalocker",
        "prometheus-client",
        "propcache",
        "protobuf",
        "psutil",
        "pyarrow",
        "pybind11",
        "py-cpuinfo",
        "pygments",
        "pyparsing",
        "pyproject-hooks",
        "pyre-extensions",
        "pytest",
        "pytest-benchmark",
        "pytest-cov",
        "pytest-mock",
        "pytest-timeout",
        "pytest-xdist",
        "python-dateutil",
        "pytorch-lightning",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "sacrebleu",
        "safetensors",
        "scikit-build-core",
        "scikit-image",
        "scikit-learn",
        "scipy",
        "seaborn",
        "sentencepiece",
        "sentence-transformers",
        "setuptools",
        "shellingham",
        "simplejson",
        "six",
        "sortedcontainers",
        "statsmodels",
        "sympy",
        "tabulate",
        "tensorboard",
        "tensorboard-data-server",
        "tensorstore",
        "threadpoolctl",
        "tifffile",
        "tiktoken",
        "timm",
        "tokenizers",
        "toolz",
        "torch",
        "torchaudio",
        "torchdiffeq",
        "torch-geometric",
        "torchmetrics",
        "torchvision",
        "tqdm",
        "transformers",
        "treescope",
        "triton",
        "typer",
        "typing-extensions",
        "typing-inspect",
        "urllib3",
        "uvloop",
        "wadler-lindig",
        "werkzeug",
        "wheel",
        "wrapt",
        "xarray",
        "xxhash",
        "yarl",
        "zipp",
    ]
)
DEVICE_PACKAGES.update(
    {
        "accelerate": "1.15.0",
        "huggingface-hub": "1.33.0",
        "numpy": "2.5.2",
        "safetensors": "0.8.0",
        "sentencepiece": "0.2.2",
        "tiktoken": "0.14.0",
        "tokenizers": "0.23.2",
        "torch": "2.11.0",
        "torchaudio": "2.11.0",
        "torchvision": "0.26.0",
        "transformers": "5.17.0",
        "triton": "3.6.0",
        "jinja2": None,
    }
)
DEVICE_PYTHON = "3.12.3"
# Never carry a second copy of these: they are tied to the image's CUDA build.
NEVER_CARRY = {
    "torch",
    "triton",
    "transformers",
    "torchvision",
    "torchaudio",
    "numpy",
    "tokenizers",
}


def _env() -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version="3.12",
        python_full_version=DEVICE_PYTHON,
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        extra="",
    )
    return env


def read_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(name).decode("utf-8"))
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else ".whl")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}")
        return 1
    env = _env()
    carried: dict[str, tuple[str, Path]] = {}
    problems = 0
    for w in wheels:
        name, ver, _ = read_metadata(w)
        key = canonicalize_name(name)
        if key in carried:
            print(f"PROBLEM two wheels of {name}: {carried[key][1].name} and {w.name}")
            problems += 1
        carried[key] = (ver, w)
    total = 0
    print(f"{'wheel':60s} {'size':>10s}")
    for key, (_ver, w) in sorted(carried.items()):
        size = w.stat().st_size
        total += size
        note = ""
        if key in NEVER_CARRY:
            note = "  <-- NEVER carry this (image has its own CUDA-matched copy)"
            problems += 1
        elif key in DEVICE_PACKAGES:
            note = f"  <-- image already has {key} {DEVICE_PACKAGES[key] or '(version unknown)'}; shadows it"
        print(f"{w.name:60s} {size / 2**20:8.2f} MiB{note}")
    print(f"{'total':60s} {total / 2**20:8.2f} MiB")
    print()
    for key, (ver, w) in sorted(carried.items()):
        _, _, reqs = read_metadata(w)
        for raw in reqs:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform/python
            dep = canonicalize_name(req.name)
            if dep in carried:
                have, where = carried[dep][0], "carried"
            elif dep in DEVICE_PACKAGES:
                have, where = DEVICE_PACKAGES[dep], "image"
            else:
                print(f"MISSING  {key} {ver}: needs {raw}  (not on the image, not carried)")
                problems += 1
                continue
            if have is None:
                status = "ok?" if str(req.specifier) else "ok"
                print(f"{status:8s} {key}: {raw}  <- {where} (version unknown)")
            elif req.specifier.contains(Version(have), prereleases=True):
                print(f"ok       {key}: {raw}  <- {where} {have}")
            else:
                print(f"CONFLICT {key} {ver}: needs {raw}, {where} has {have}")
                problems += 1
    print()
    print(
        "problems:", problems, "(ok? = present on the image, version not transcribed: check there)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
