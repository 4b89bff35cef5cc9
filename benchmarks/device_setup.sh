# Source this on the GPU device machine, from the repo root:   source benchmarks/device_setup.sh
# (the run call must name .whl in `carry`).
#
# - installs the carried wheels (.whl/*.whl) whose package the image lacks into /tmp/site,
#   never a second torch/triton/transformers/numpy/tokenizers (they are tied to the image's CUDA build);
# - puts /tmp/site and ./src on PYTHONPATH (sftune is used from source, not installed);
# - sets the environment the device pages ask for (NVLink multicast off) and offline HF settings
#   (the machine reaches no network: without them hub lookups stall until they time out).
# Returns non-zero (without exiting the calling shell) on failure.

_sftune_setup() {
    local repo site py
    repo="$(pwd)"
    site="${SFTUNE_SITE:-/tmp/site}"
    py="${PYTHON:-python3}"

    # NVLink multicast must stay off (KINDS.md: a program using it can take the host's shared GPUs
    # out of service). Harmless on one GPU; required on the -x2/-x4/-x8 kinds.
    export NCCL_NVLS_ENABLE=0
    export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    export NVSHMEM_DISABLE_NVLS=1

    export PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 WANDB_DISABLED=true
    export HF_HOME="${HF_HOME:-/tmp/hf}" HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-/tmp/hf/datasets}"
    export TOKENIZERS_PARALLELISM=false

    if ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
        local todo
        # Pick the wheels whose distribution is NOT installed in the image's python.
        todo="$("$py" - "$repo/.whl" <<'EOF'
import sys, pathlib, importlib.metadata as md, re
never = {"torch", "triton", "transformers", "torchvision", "torchaudio", "numpy", "tokenizers"}
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    if name in never:
        print(f"device_setup: refusing to install {w.name}", file=sys.stderr)
        continue
    try:
        v = md.version(name)
        print(f"device_setup: image has {name} {v}; skipping {w.name}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(w)
EOF
)" || return 1
        if [ -n "$todo" ]; then
            # shellcheck disable=SC2086
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" $todo || return 1
        fi
    fi
    export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"

    "$py" - <<'EOF' || return 1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("transformers", "tokenizers", "safetensors", "accelerate", "datasets", "trl", "triton",
             "numpy", "pyarrow", "pandas", "fsspec", "huggingface_hub", "gguf", "platformdirs",
             "liger_kernel", "matplotlib", "yaml", "tqdm", "dill", "multiprocess"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:16s} {getattr(m, '__version__', '?'):12s} {getattr(m, '__file__', '')}")
    except Exception as e:  # report, keep going
        print(f"  {name:16s} FAILED: {type(e).__name__}: {e}")
EOF
}
_sftune_setup
