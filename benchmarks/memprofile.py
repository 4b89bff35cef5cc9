"""Where a long sequence's memory goes (issue 26: "why the adapter runs hold twice as much"):
one training step of the 8B config (random init, no download) with LoRA and with a full
fine-tune, at 16K and 32K tokens, under the CUDA allocator's memory history; at the step's peak,
the live tensors grouped by the Python frame that allocated them: a table of bytes, bytes per
token and frame, printed and written to <out>/memprofile.txt (and .json).

    # one H200 (~5 minutes: each run builds the 8B, compiles its layer, warms up, profiles)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/memprofile.py \
        --out runs/bench/memprofile
    # a lever on (issue 26's, once merged): --mods offload,tiled; checkpointing off: --mods ""
    # CPU dry run on a tiny Llama: the same code path and table, from a CPU allocation tracer
    python benchmarks/memprofile.py --dry --out /tmp/memprofile

Each run is sftune's own step, as benchmarks/throughput.py runs it (the same config, levers as
"+" modifiers: default activation checkpointing, compiled layers, fused loss, r 16 on all
linears), at micro-batch 1. The step before the profiled one is a warm-up (compile, optimizer
state), so the profile sees the steady state. The tensors live before the profiled step
(weights, optimizer state) are one row, "before the step"; every other row is what the step
allocated and still held at its peak. A frame is the innermost Python frame outside torch
itself (a transformers, peft or sftune line; a backward's tensors show the `.backward()` call,
a recompute's the layer's own lines again); --frames 2 shows the caller too. With compiled
layers (the default, as measured), a layer's tensors are the inductor graph's (a
torchinductor_*/...py frame); --compile off attributes them to the model's own lines.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from course_loop import build_model  # noqa: E402
from sftune.train import module, step  # noqa: E402
from sftune.train.distributed import World  # noqa: E402
from sftune.train.optim import build_optimizer  # noqa: E402
from sftune.transforms import lora
from throughput import global_batches, model_config, quantize_4bit, sftune_config  # noqa: E402

MIB = 2**20
# Frames inside these paths are the machinery, not the allocation's reason.
SKIP = ("/torch/", "/contextlib.py", "/functools.py", "memprofile.py")


# ----------------------------------------------------------------------------- the analysis


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """Replay allocator events (the CUDA snapshot's device trace: action alloc / free_requested
    / free_completed, addr, size, frames): (the peak of the bytes they hold, the alloc events
    live at that peak). Bytes allocated before the trace began are not in it."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for e in events:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif action in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, at_peak


def frame_of(frames: list[dict], depth: int = 1) -> str:
    """The innermost `depth` Python frames outside torch, as path:line (function)."""
    mine = [f for f in frames if not any(s in f.get("filename", "") for s in SKIP)]
    picked = (mine or frames)[:depth]
    if not picked:
        return "(no Python frame)"
    return " < ".join(
        f"{'/'.join(Path(f['filename']).parts[-2:])}:{f['line']} ({f['name']})" for f in picked
    )


def group(allocs: list[dict], depth: int = 1) -> list[tuple[int, int, str]]:
    """(bytes, tensors, frame) per allocating frame, largest first."""
    rows: dict[str, list[int]] = {}
    for a in allocs:
        r = rows.setdefault(frame_of(a.get("frames", []), depth), [0, 0])
        r[0] += a["size"]
        r[1] += 1
    return sorted(((b, n, f) for f, (b, n) in rows.items()), key=lambda r: -r[0])


def table(name: str, tokens: int, before: int, peak: int, rows, top: int = 25) -> str:
    """The printed table: the peak, then one line per frame (bytes, bytes per token)."""
    lines = [
        f"{name}: peak {(before + peak) / MIB:,.1f} MiB at {tokens:,} tokens = {before / MIB:,.1f} "
        f"MiB before the step + {peak / MIB:,.1f} MiB the step held "
        f"({peak / tokens / MIB:.3f} MiB per token)",
        f"{'MiB':>10} {'KiB/token':>10} {'tensors':>8}  frame",
        f"{before / MIB:10,.1f} {'':>10} {'':>8}  before the step (weights, optimizer state, ...)",
    ]
    for b, n, f in rows[:top]:
        lines.append(f"{b / MIB:10,.1f} {b / tokens / 1024:10.2f} {n:8d}  {f}")
    rest = rows[top:]
    if rest:
        b = sum(r[0] for r in rest)
        lines.append(f"{b / MIB:10,.1f} {b / tokens / 1024:10.2f} {len(rest):8d}  (other frames)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- recording


class CpuAllocTracer(torch.utils._python_dispatch.TorchDispatchMode):
    """--dry: the CUDA memory history's events, on the CPU. Every storage an op returns is an
    alloc event with the Python stack (innermost first); its release, a free_requested."""

    def __init__(self):
        super().__init__()
        self.events: list[dict] = []
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._record(t, inputs)
        return out

    def _record(self, t: torch.Tensor, inputs: set[int]) -> None:
        s = t.untyped_storage()
        addr = s.data_ptr()
        if addr in self.seen or addr in inputs or s.nbytes() == 0:
            return  # a view or an in-place result: no new storage
        self.seen.add(addr)
        stack = traceback.extract_stack()[:-3]  # less this tracer's own frames
        frames = [{"filename": f.filename, "line": f.lineno, "name": f.name} for f in stack][::-1]
        self.events.append({"action": "alloc", "addr": addr, "size": s.nbytes(), "frames": frames})
        weakref.finalize(s, self._free, addr)  # a storage's Python object lives as long as it

    def _free(self, addr: int) -> None:
        self.seen.discard(addr)
        self.events.append({"action": "free_requested", "addr": addr})


def held_bytes(model: torch.nn.Module, optimizer) -> int:
    """What a CPU step starts with: the parameters' storages and the optimizer's state."""
    tensors = [
        *model.parameters(),
        *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)),
    ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def recorded_step(one_step, batch, device) -> tuple[int, list[dict]]:
    """(bytes allocated before the step, the allocator's events during it)."""
    if device.type == "cpu":
        tracer = CpuAllocTracer()
        with tracer:
            one_step(batch)
        return held_bytes(one_step.args[0], one_step.args[1]), tracer.events
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        one_step(batch)
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return before, snap["device_traces"][device.index or 0]


# ----------------------------------------------------------------------------- one run


def run(args, device, kind: str, seq: int) -> dict:
    """One profiled step of `kind` (lora or full) at `seq` tokens."""
    mods = ["lora"] if kind == "lora" else []
    mods += [m for m in args.mods.split(",") if m]
    if args.qlora and kind == "lora":
        mods[0] = "qlora"
    # the benchmark's own config builder (modifiers as in throughput.py)
    ns = argparse.Namespace(lr=1e-5, steps=2, compile="off" if args.dry else args.compile)
    cfg = sftune_config(
        ns, device, seq=seq, batch=1, micro=1, compile_=None, fused="on", ac=False, mods=mods
    )
    mcfg = model_config(args)
    model = build_model(mcfg, device, args.dtype, seed=0)
    if cfg.adapter.qlora:
        quantize_4bit(model)
    if cfg.adapter.lora or cfg.adapter.qlora:
        torch.manual_seed(1)
        lora.apply_lora(model, cfg)
    built = module.build_module(cfg, model, device, World())
    optimizer, scheduler = build_optimizer(list(built.module.parameters()), cfg.optim, 2, device)
    one_step = functools.partial(
        step.train_step, built.module, optimizer, scheduler, grad_clip=cfg.optim.grad_clip
    )
    b1, b2 = global_batches(mcfg.vocab_size, 1, seq, 2)

    def batch(b):
        return [{k: v.to(device) for k, v in b.items()}]

    one_step(batch(b1))  # warm-up: compile, optimizer state
    before, events = recorded_step(one_step, batch(b2), device)
    peak, live = live_at_peak(events)
    rows = group(live, args.frames)
    length = f"{seq // 1024}K" if seq % 1024 == 0 else f"{seq:,}"
    name = f"{kind} {length}" + (f" +{'+'.join(mods)}" if mods else "")
    del built, optimizer, scheduler, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(
        name=name,
        seq=seq,
        mods=mods,
        before_bytes=before,
        step_peak_bytes=peak,
        rows=[dict(bytes=b, tensors=n, frame=f) for b, n, f in rows],
        table=table(name, seq, before, peak, rows, args.top),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="llama3.1-8b")
    ap.add_argument("--runs", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--seqs", default=None, help="lengths, comma-separated (16384,32768)")
    ap.add_argument("--mods", default="ac", help="throughput.py modifiers, comma-separated")
    ap.add_argument("--qlora", action="store_true", help="the adapter runs over a 4-bit base")
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    ap.add_argument("--max-pos", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--frames", type=int, default=1, help="frames per row (2: with the caller)")
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--out", default="runs/bench/memprofile")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny Llama (256 and 512 tokens)")
    args = ap.parse_args(argv)
    if args.dry:
        args.config = "tiny"
    args.seqs = args.seqs or ("256,512" if args.dry else "16384,32768")
    device = torch.device("cpu" if args.dry else "cuda")
    args.dtype = torch.float32 if args.dry else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, texts = [], []
    for kind in args.runs.split(","):
        for seq in map(int, args.seqs.split(",")):
            try:
                res = run(args, device, kind, seq)
            except Exception as e:  # one failing run (out of memory) must not lose the others
                traceback.print_exc()
                res = dict(name=f"{kind} {seq}", seq=seq, error=f"{type(e).__name__}: {e}"[:500])
                res["table"] = f"{res['name']}: FAILED {res['error']}"
            print(res["table"] + "\n", flush=True)
            results.append(res)
            texts.append(res["table"])
            (out / "memprofile.txt").write_text("\n\n".join(texts) + "\n")
            (out / "memprofile.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
