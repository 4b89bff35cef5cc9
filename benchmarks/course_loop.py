"""Baseline: the CS336-style naive training loop, for GPU throughput/memory comparisons with sftune.

What it does per optimizer step (exactly the course's reference loop, nothing fused or overlapped):
    for each of `accum` micro-batches:
        logits = model(input_ids).logits
        loss = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1)) / accum
        loss.backward()
    clip_grad_norm_(params, 1.0); opt.step(); sched.step(); opt.zero_grad()
    loss.item()   # the course syncs on the host every step; so does this baseline

AdamW (fused or not), linear warmup + cosine decay through a LambdaLR, with the same schedule
formula as sftune.train.optim (warmup (s+1)/W, W = ceil(warmup_ratio * steps)).

Usage (benchmarks/throughput.py runs it as its `baseline`, on the same batches as sftune):
    python benchmarks/course_loop.py --smoke                     # CPU, 2-layer width-64 Llama, 3 steps
    python benchmarks/course_loop.py --model llama3.1-8b --micro-batch 2 --accum 16 \
        --seq-len 512 --steps 15 --lr 1e-5 --out course_8b.json                       # CUDA, bf16
    python benchmarks/course_loop.py --model smollm2-135m ...                          # random init
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# Shared with the trainer so both loops use one schedule and one FLOPs formula.
from sftune.models import count_params, model_flops_per_token  # noqa: E402
from sftune.train.optim import lr_factor  # noqa: E402


def _llama(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **rest
):
    """A Llama-architecture config as LlamaConfig keywords (SwiGLU, no biases)."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        **rest,
    )


# Random init for throughput and memory: the arithmetic of the real models, no download.
CONFIGS = {
    # meta-llama/Llama-3.1-8B config.json
    "llama3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8)
    | dict(
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # meta-llama/Llama-3.2-1B config.json (tied embeddings: 1.24B parameters)
    "llama3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8)
    | dict(
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json: the embedded default model's shape
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3)
    | dict(
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny": _llama(256, 64, 128, 2, 4, 2, max_position_embeddings=2048, tie_word_embeddings=False),
}


def make_config(name_or_dict: str | dict) -> LlamaConfig:
    d = CONFIGS[name_or_dict] if isinstance(name_or_dict, str) else name_or_dict
    return LlamaConfig(**d)


def build_model(config, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """Random init directly on `device` in `dtype` (no CPU materialization: the 8B init takes
    seconds on the GPU instead of minutes on the CPU). Works on transformers 5.17 and 5.24
    (`dtype=`; falls back to the older `torch_dtype=`)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    kw = dict(attn_implementation="sdpa")
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
        except TypeError:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, **kw)
    model = model.to(device=device, dtype=dtype)
    assert all(p.device.type == device.type for p in model.parameters())
    model.config.use_cache = False
    model.train()
    return model


# ----------------------------------------------------------------------------- data


def random_batches(
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    n: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`n` deterministic (input_ids, labels) micro-batches of shape (micro_batch, seq_len).

    Each comes from one random token stream of seq_len + 1 tokens per row, shifted:
    input_ids = stream[:, :-1], labels = stream[:, 1:]. Generated on the CPU with its own
    torch.Generator, so the data is identical on every device and for every consumer
    (baseline and sftune) given the same seed, and the global RNG is untouched.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    for _ in range(n):
        stream = torch.randint(
            0, vocab_size, (micro_batch, seq_len + 1), generator=g, dtype=torch.long
        )
        yield (
            stream[:, :-1].contiguous().to(device, non_blocking=True),
            stream[:, 1:].contiguous().to(device, non_blocking=True),
        )


# ----------------------------------------------------------------------------- FLOPs / MFU


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = 989e12) -> float:
    """Model FLOPs utilization; 989e12 = H100/H200 SXM dense bf16 datasheet peak (a square
    8192 bf16 matmul reaches about 790e12 on an H200)."""
    return tokens_per_s * flops_per_token / peak_flops


# ----------------------------------------------------------------------------- the loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_course_loop(
    model: torch.nn.Module,
    batches_iter: Iterable,
    *,
    micro_batch: int,
    accum: int,
    steps: int,
    lr: float,
    fused_adamw: bool,
    device: torch.device | str,
    warmup_ratio: float = 0.03,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    warmup_steps_excluded: int = 2,
) -> dict:
    """The naive loop. `batches_iter` yields (input_ids, labels) or dicts with those keys,
    at least steps * accum of them. Returns per-step losses (mean over the step's micro-batches),
    tokens/s (steps after the first `warmup_steps_excluded`), peak memory and wall time."""
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if fused_adamw:
        opt_kw["fused"] = True
    opt = torch.optim.AdamW(params, **opt_kw)
    warmup = math.ceil(warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, warmup, min_lr_ratio)
    )
    V = model.config.vocab_size
    it = iter(batches_iter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses, grad_norms, step_times = [], [], []
    seq_len = None
    _sync(device)
    t_start = time.perf_counter()
    for _step in range(steps):
        t0 = time.perf_counter()
        step_loss = 0.0
        for _ in range(accum):
            batch = next(it)
            if isinstance(batch, dict):
                input_ids, labels = batch["input_ids"], batch["labels"]
            else:
                input_ids, labels = batch
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            assert input_ids.shape[0] == micro_batch, (input_ids.shape, micro_batch)
            seq_len = input_ids.shape[1]
            logits = model(input_ids).logits
            loss = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1)) / accum
            loss.backward()
            step_loss = step_loss + loss.detach()
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step_loss.item()))  # host sync every step, like the course
        grad_norms.append(float(gn.item()))
        step_times.append(time.perf_counter() - t0)
    _sync(device)
    wall = time.perf_counter() - t_start

    tokens_per_step = micro_batch * accum * seq_len
    timed = step_times[warmup_steps_excluded:] or step_times
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    out = dict(
        losses=losses,
        grad_norms=grad_norms,
        step_times_s=step_times,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_s,
        timed_steps=len(timed),
        wall_time_s=wall,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        micro_batch=micro_batch,
        accum=accum,
        seq_len=seq_len,
        steps=steps,
        lr=lr,
        fused_adamw=fused_adamw,
    )
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, tiny 2-layer width-64 Llama, 3 steps"
    )
    ap.add_argument("--model", default="llama3.1-8b", choices=sorted(CONFIGS))
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--no-fused", action="store_true", help="plain (foreach) AdamW instead of fused"
    )
    ap.add_argument(
        "--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)"
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)

    if a.smoke:
        a.model, a.micro_batch, a.accum, a.seq_len, a.steps, a.lr = "tiny", 2, 2, 32, 3, 1e-3
        a.device = a.device or "cpu"
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, a.dtype)
        if a.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    fused = not a.no_fused
    if fused and device.type == "cpu" and dtype == torch.bfloat16:
        fused = False  # fused AdamW on CPU supports fp32/fp16 params only on some builds

    cfg = make_config(a.model)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, seed=a.seed)
    _sync(device)
    init_s = time.perf_counter() - t0
    fpt = model_flops_per_token(cfg, a.seq_len)
    batches = random_batches(
        cfg.vocab_size, a.micro_batch, a.seq_len, a.steps * a.accum, a.seed, device
    )
    res = run_course_loop(
        model,
        batches,
        micro_batch=a.micro_batch,
        accum=a.accum,
        steps=a.steps,
        lr=a.lr,
        fused_adamw=fused,
        device=device,
    )
    res.update(
        model=a.model,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        init_time_s=init_s,
        flops_per_token=fpt,
        non_embedding_params=count_params(model)[1],
        mfu=mfu(res["tokens_per_s"], fpt, a.peak_flops),
        peak_flops=a.peak_flops,
        torch=torch.__version__,
    )
    peak = res["peak_memory_bytes"]
    print(f"losses: {' '.join(f'{x:.4f}' for x in res['losses'])}")
    print(
        f"{a.model} {res['dtype']} {res['device_name']}: mb={a.micro_batch} accum={a.accum} seq={a.seq_len} "
        f"tok/s={res['tokens_per_s']:.0f} MFU={100 * res['mfu']:.1f}% "
        f"peak_mem={'-' if peak is None else f'{peak / 2**30:.2f} GiB'} wall={res['wall_time_s']:.1f}s "
        f"init={init_s:.1f}s"
    )
    if a.smoke:
        assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"])
        assert abs(res["losses"][0] - math.log(cfg.vocab_size)) < 0.5, res["losses"][0]
        print("smoke OK")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
