"""The matrix-multiply floor of one training step: every GEMM of the step, timed alone.

For a Llama-shaped model and T tokens per micro-batch, times each projection's forward
(X @ W.T), input-gradient (dY @ W) and weight-gradient (dY.T @ X) GEMM with CUDA events
(median of 20, two input sets in rotation), the output projection in the fused loss's
chunks, and causal attention forward + backward with each SDPA kernel. The sum over the
layers is the time a step would take if nothing but its GEMMs and attention ran: the
ceiling any trainer can approach. Also times the fused QKV and gate/up alternatives.

    python benchmarks/gemm_floor.py --out gemm_floor.json   # Llama 3.1 8B, T=16384
    benchmarks/gpu.sh gemm                                  # the same
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn(0)
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % 2)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def linear_times(t: int, k: int, n: int, dtype=torch.bfloat16) -> dict:
    """fwd, dgrad, wgrad ms of a (k -> n) projection over t tokens, and their TFLOP/s."""
    dev = "cuda"
    xs = [torch.randn(t, k, device=dev, dtype=dtype) for _ in range(2)]
    ws = [torch.randn(n, k, device=dev, dtype=dtype) / k**0.5 for _ in range(2)]
    dys = [torch.randn(t, n, device=dev, dtype=dtype) for _ in range(2)]
    out = {
        "fwd": median_ms(lambda i: F.linear(xs[i], ws[i])),
        "dgrad": median_ms(lambda i: dys[i] @ ws[i]),
        "wgrad": median_ms(lambda i: dys[i].t() @ xs[i]),
    }
    flops = 2.0 * t * k * n
    out["tflops"] = {p: flops / (ms * 1e-3) / 1e12 for p, ms in list(out.items())}
    out["total_ms"] = out["fwd"] + out["dgrad"] + out["wgrad"]
    return out


def attention_times(batch: int, seq: int, heads: int, kv_heads: int, dim: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        # HF's SDPA path repeats the KV heads to the query heads before the call.
        q, k, v = (
            torch.randn(
                batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
            )
            for _ in range(3)
        )
        g = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd(_i, q=q, k=k, v=v, g=g, backend=backend):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(g)

        try:
            out[name] = median_ms(fwd_bwd)
        except Exception as e:  # a backend may not support the shape
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=4096, help="the fused loss's chunk")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    h, i, d = a.hidden, a.intermediate, a.hidden // a.heads
    kv = a.kv_heads * d
    t = a.tokens
    proj = {
        "q": (h, h),
        "k": (h, kv),
        "v": (h, kv),
        "o": (h, h),
        "gate": (h, i),
        "up": (h, i),
        "down": (i, h),
    }
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": t}
    res["layer"] = {name: linear_times(t, k, n) for name, (k, n) in proj.items()}
    res["fused_alternatives"] = {
        "qkv": linear_times(t, h, h + 2 * kv),
        "gate_up": linear_times(t, h, 2 * i),
    }
    res["lm_head_chunk"] = linear_times(a.chunk, h, a.vocab)
    res["attention_fwd_bwd_ms"] = attention_times(t // a.seq, a.seq, a.heads, a.kv_heads, d)
    layer_ms = sum(v["total_ms"] for v in res["layer"].values())
    head_ms = res["lm_head_chunk"]["total_ms"] * (t // a.chunk)
    attn = res["attention_fwd_bwd_ms"]
    attn_ms = min(v for v in attn.values() if isinstance(v, float))
    step_ms = a.layers * (layer_ms + attn_ms) + head_ms
    fused_gain = a.layers * (
        sum(res["layer"][n]["total_ms"] for n in ("q", "k", "v", "gate", "up"))
        - sum(v["total_ms"] for v in res["fused_alternatives"].values())
    )
    res["floor_ms_per_micro_batch"] = step_ms
    res["floor_tokens_per_s"] = t / (step_ms * 1e-3)
    res["fused_projection_saving_ms"] = fused_gain
    print(f"{res['device']}, torch {res['torch']}, {t} tokens per micro-batch")
    for name, v in {
        **res["layer"],
        **res["fused_alternatives"],
        "lm_head": res["lm_head_chunk"],
    }.items():
        tf = v["tflops"]
        print(
            f"  {name:8s} fwd {v['fwd']:7.3f} ms ({tf['fwd']:4.0f} TF/s)  dgrad {v['dgrad']:7.3f} "
            f"({tf['dgrad']:4.0f})  wgrad {v['wgrad']:7.3f} ({tf['wgrad']:4.0f})"
        )
    print(f"  attention fwd+bwd per layer: {attn}")
    print(
        f"floor: {step_ms:.0f} ms per micro-batch of {t} tokens = {res['floor_tokens_per_s']:,.0f} "
        f"tokens/s (GEMMs + attention only); fused QKV + gate/up would save {fused_gain:.1f} ms"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
