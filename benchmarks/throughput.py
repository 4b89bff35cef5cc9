"""Training throughput: the course's loop against sftune's trainer, same model and data, on one
GPU or many.

Each run starts from the same random init (seed 0) and sees the same token batches, so the
per-step losses of the baseline and of sftune are comparable step by step.

    # one GPU, the Llama 3.1 8B config (random init, no download); `benchmarks/gpu.sh throughput`:
    python benchmarks/throughput.py --runs baseline,sftune,lean --steps 15 --out throughput.json
    # CPU smoke test with a tiny Llama:
    python benchmarks/throughput.py --config tiny --runs baseline,sftune-mb4,lean \
        --steps 5 --warmup 1 --device cpu
    # what DDP and FSDP2 cost at world size 1 (Llama-3.2-1B shape; `benchmarks/gpu.sh dist`):
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun --standalone --nproc-per-node 1 \
        benchmarks/throughput.py --config llama3.2-1b --reference sftune+none \
        --runs sftune+none,sftune+ddp,sftune+fsdp,sftune+fsdp+reshard --profile sftune+fsdp
    # many GPUs (--dist auto: DDP or FSDP2; the same global batch split over the ranks; the
    # baseline is skipped); `benchmarks/gpu.sh scaling` runs 1 and N GPUs and compares:
    torchrun --standalone --nproc-per-node 8 benchmarks/throughput.py --runs sftune

Runs (comma-separated --runs):
    baseline     the course loop: micro-batch 2 x 16 accumulation, plain AdamW, full logits, .item() per step
    sftune       sftune's trainer step with its GPU defaults: largest micro-batch that fits (probed),
                 per-layer torch.compile, fused chunked linear+CE (compiled chunk math),
                 fused AdamW, no host sync
    sftune-mbN   the same with micro-batch N (e.g. sftune-mb16)
    plain-mbN    sftune's step with compile and fused loss off (isolates those two levers)
    lean         memory-lean (fits an 80 GB GPU): micro-batch 8 x 4 accumulation, compile's
                 activation memory budget 0.8 (recomputes the cheapest activations)
    lean-ac      micro-batch 8 with activation checkpointing
    docN         document-aware packing at sequence length N (same tokens per step), SDPA masks
    flexN        the same with FlexAttention

Modifiers, appended with "+" to any sftune run (e.g. sftune-mb8+budget0.5+cudnn):
    +cudnn, +flash   restrict SDPA to that kernel (--sdpa-backend)
    +autotune        compile the layers with max-autotune-no-cudagraphs (--compile-mode)
    +budgetX         compile's activation memory budget X (--activation-memory-budget)
    +ce0             fused loss with its per-chunk softmax/gradient math left eager (uncompiled)
    +cstep           clipping + AdamW compiled together (--compile-step) instead of fused AdamW
    +adam8           torchao's AdamW8bit, both moments in 8 bits (--optimizer adamw8bit)
    +adam8bnb        bitsandbytes' AdamW8bit, the same scheme (--optimizer adamw8bit-bnb)
    +lora            LoRA r 16 (alpha 32) on all seven linears of every block (--lora), a frozen base
    +ac              activation checkpointing (--activation-checkpointing)
    +qlora           the same adapters over a 4-bit NF4 base (bitsandbytes) (--qlora)
    +eager           nothing compiled (--compile off)
    +capN            at most N GiB of GPU memory (--max-memory-gib N); with micro-batch 0 the
                     probe picks the micro-batch and checkpointing that fit
    +fp8tw, +fp8rw   FP8 linears in the decoder blocks, torchao's tensorwise or rowwise recipe (--fp8)
    +fp8auto         with +fp8tw/+fp8rw: only the linears torchao's size thresholds pick
                     (--fp8-linears auto; the 8B's k/v projections stay bf16); +fp8all: every
                     one (--fp8-linears all, the default)
    +none, +ddp, +fsdp  how the ranks hold the model (--dist; default auto: none on one rank)
    +reshard, +noreshard  FSDP frees each layer's gathered parameters after forward, or keeps
                     them (--reshard-after-forward on/off; default auto)
    +dtensoropt      FSDP: torch's clipping and AdamW on the DTensors, as sftune did before it
                     stepped their local shards
    +expand, +noexpand  the CUDA allocator's expandable segments on or off for this run
                     (`sftune train` turns them on; PYTORCH_CUDA_ALLOC_CONF sets the default)
    +offload, +offloadauto  offloaded activation checkpoints, on or left to the memory plan
                     (--activation-offload on/auto; on implies checkpointing)
    +tiled, +tiledN, +tiledauto  the MLP tiled over the sequence (--tiled-mlp on, N tokens per
                     tile (--tiled-mlp-chunk N), or auto: left to the memory plan)
    +ropeKIND:F      rope scaling past the model's positions (--rope-scaling KIND:F), e.g.
                     +ropeyarn:4, +ropelinear:2, +ropellama3:4

Long sequences (issue 26): --seq 131072 --batch 1 with --max-pos N (the 8B config with
max_position_embeddings N instead of 131,072, as the issue allows: the llama3 rope frequencies
are unchanged) and --layers L (the first L decoder blocks only: a cheaper proxy, named in the
JSON). MFU is reported twice: `mfu` with PaLM's attention term (12 x layers x d x T per token,
the full T x T scores), and `mfu_causal` with the causal half that the kernels compute (6 x
layers x d x T); at 512K the attention term is 20 times the weights', so the two differ ~2x.

`lean` takes modifiers too (e.g. lean+fp8tw: micro-batch 8, budget 0.8, FP8 tensorwise).

PEFT, the baseline for LoRA: peft-mbN (micro-batch N), peft-mbN+ac (with checkpointing),
peft-mbN+ac+qlora (over the same 4-bit base): the plain PEFT + Hugging Face loop that TRL wraps,
from the same initial adapters as +lora.

--profile NAME[,NAME] profiles two more steps of those runs after the timing: a kernel table by
category (GEMM, attention, compiled Triton, optimizer, ...), GPU idle time, and torch.profiler's
operator tables (self CPU time, self GPU time), in <out dir>/profile_<NAME>.txt ("+" written
as "_"). The GEMMs that aten::_scaled_mm launched are counted apart, as "gemm (fp8)"; the
other GEMMs of an FP8 run (output projection, loss) stay "gemm". --reference NAME compares
every run with that one (speed, losses); default baseline.

Each run's JSON also holds what explains a slow run without a profile: the engine and
resharding (`dist`), the allocator's retries and device allocations during the timed steps
(`allocator`), and the compiler's graph and graph-break counts (`dynamo`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from course_loop import (  # noqa: E402
    CONFIGS,
    build_model,
    make_config,
    mfu,
    random_batches,
    run_course_loop,
)
from sftune import config as config_mod  # noqa: E402
from sftune.models import model_flops_per_token  # noqa: E402
from sftune.train import distributed, module, step  # noqa: E402
from sftune.train.optim import build_optimizer, lr_factor, warmup_steps  # noqa: E402
from sftune.transforms import fp8, lora

LORA_R, LORA_ALPHA = 16, 32.0  # the LoRA runs: r 16 on every linear of the decoder blocks
FP8_MODS = {"fp8tw": "tensorwise", "fp8rw": "rowwise"}
LEVERS = ("activation_offload", "tiled_mlp", "tiled_mlp_chunk", "rope_scaling")  # issue 26


def model_config(args):
    """The --config model's config, with --max-pos and --layers applied."""
    mcfg = make_config(args.config)
    if args.max_pos:  # positions for long runs (the 8B's own limit is 131,072)
        mcfg.max_position_embeddings = args.max_pos
    if args.layers:
        mcfg.num_hidden_layers = args.layers
    return mcfg


def causal_flops_per_token(mcfg, seq: int) -> float:
    """model_flops_per_token with the attention term halved: a causal kernel computes half of
    the T x T scores (and their values) that PaLM's 12 x layers x d x T counts."""
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
    d_attn = mcfg.num_attention_heads * head_dim
    return model_flops_per_token(mcfg, seq) - 6.0 * mcfg.num_hidden_layers * d_attn * seq


def global_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0, docs: bool = False):
    """`steps` global batches {input_ids, labels[, position_ids]} of (batch, seq), on the CPU:
    the course loop's random batches, so every run sees the same tokens."""
    g = torch.Generator().manual_seed(seed + 1)  # document lengths
    out = []
    for input_ids, labels in random_batches(vocab, batch, seq, steps, seed):
        b = {"input_ids": input_ids, "labels": labels}
        if docs:
            b["position_ids"] = _doc_positions(batch, seq, g)
        out.append(b)
    return out


def _doc_positions(batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """Position ids of packed documents of 64..1024 tokens (GSM8K/Alpaca-like), restarting at 0."""
    pos = torch.empty(batch, seq, dtype=torch.long)
    for r in range(batch):
        i = 0
        while i < seq:
            n = min(int(torch.randint(64, 1024, (1,), generator=g)), seq - i)
            pos[r, i : i + n] = torch.arange(n)
            i += n
    return pos


def _split(b: dict, micro: int, device) -> list[dict]:
    n = b["input_ids"].shape[0]
    return [
        {k: v[i : i + micro].pin_memory().to(device, non_blocking=True) for k, v in b.items()}
        for i in range(0, n, micro)
    ]


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_baseline(args, device) -> dict:
    cfg = model_config(args)
    model = build_model(cfg, device, args.dtype, seed=0)
    batches = global_batches(cfg.vocab_size, args.batch, args.seq, args.steps)
    micro = [(m["input_ids"], m["labels"]) for b in batches for m in _split(b, 2, device)]
    res = run_course_loop(
        model,
        micro,
        micro_batch=2,
        accum=args.batch // 2,
        steps=args.steps,
        lr=args.lr,
        fused_adamw=False,
        device=device,
        warmup_steps_excluded=args.warmup,
    )
    del model
    return res


def sftune_config(args, device, *, seq, batch, micro, compile_, fused, ac, mods):
    """The trainer's config for one run; `mods` are the "+" modifiers of its name."""
    flat = dict(
        seq_length=seq,
        batch_size=batch,
        micro_batch_size=micro,
        lr=args.lr,
        max_steps=args.steps,
        compile=compile_ or args.compile,
        fused_loss=fused,
        activation_checkpointing=ac,
        device=device.type,
    )
    for m in mods:
        if m in ("cudnn", "flash"):
            flat["sdpa_backend"] = m
        elif m == "autotune":
            flat["compile_mode"] = "max-autotune-no-cudagraphs"
        elif m.startswith("budget"):
            flat["activation_memory_budget"] = float(m.removeprefix("budget"))
        elif m == "cstep":
            flat["compile_step"] = True
        elif m == "adam8":  # torchao's AdamW8bit: 8-bit moments (--optimizer adamw8bit)
            flat["optimizer"] = "adamw8bit"
        elif m == "adam8bnb":  # bitsandbytes' AdamW8bit (--optimizer adamw8bit-bnb)
            flat["optimizer"] = "adamw8bit-bnb"
        elif m == "lora":  # r 16 on all seven linears of every block, as the PEFT runs
            flat.update(lora=True, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
        elif m == "qlora":  # the same adapters over a 4-bit NF4 base (bitsandbytes)
            flat.update(qlora=True, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
        elif m == "eager":  # the decoder layers and the loss left uncompiled (--compile off)
            flat["compile"] = "off"
        elif m.startswith("cap"):  # --max-memory-gib N: the probe plans within N GiB
            flat["max_memory_gib"] = float(m.removeprefix("cap"))
        elif m == "ac":
            flat["activation_checkpointing"] = True
        elif m in FP8_MODS:
            flat["fp8"] = FP8_MODS[m]
        elif m in ("fp8all", "fp8auto"):  # every decoder linear in FP8 (the default), or
            flat["fp8_linears"] = m.removeprefix("fp8")  # torchao's size thresholds
        elif m in ("none", "ddp", "fsdp"):
            flat["dist"] = m
        elif m in ("reshard", "noreshard"):
            flat["reshard_after_forward"] = "on" if m == "reshard" else "off"
        elif m in ("offload", "offloadauto"):  # issue 26: --activation-offload on / auto
            flat["activation_offload"] = "auto" if m == "offloadauto" else "on"
        elif m == "tiledauto":  # issue 26: --tiled-mlp auto
            flat["tiled_mlp"] = "auto"
        elif m == "tiled" or (m.startswith("tiled") and m.removeprefix("tiled").isdigit()):
            flat.update(tiled_mlp="on", tiled_mlp_chunk=int(m.removeprefix("tiled") or 0))
        elif m.startswith("rope"):  # issue 26: --rope-scaling KIND:FACTOR
            flat["rope_scaling"] = m.removeprefix("rope")
        elif m not in ("ce0", "expand", "noexpand", "dtensoropt"):
            raise SystemExit(f"unknown modifier +{m}")
    return config_mod.from_flat(flat)


@contextlib.contextmanager
def allocator(mods: tuple[str, ...]):
    """+expand / +noexpand: the CUDA allocator's expandable segments for one run, then back to
    what PYTORCH_CUDA_ALLOC_CONF said."""
    wanted = {"expand": True, "noexpand": False}.get(next((m for m in mods if "expand" in m), ""))
    if wanted is None or not torch.cuda.is_available():
        yield
        return
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))
    before = "expandable_segments:true" in conf.replace(" ", "").lower()
    torch.cuda.memory._set_allocator_settings(f"expandable_segments:{wanted}")
    try:
        yield
    finally:
        _free()
        torch.cuda.memory._set_allocator_settings(f"expandable_segments:{before}")


def allocator_stats() -> dict:
    """The caching allocator's counters since the timed steps began: retries (a cudaFree of
    cached blocks and a second try, which synchronizes), device allocations and frees."""
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    keys = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc")
    return {k: stats[k] for k in (*keys, "num_device_free") if k in stats}


def dynamo_stats() -> dict:
    """What the compiler did in this run: graphs, graph breaks (top reasons), frames."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "stats": dict(counters["stats"]),
        "frames": dict(counters["frames"]),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": [f"{n} x {r[:200]}" for r, n in breaks.most_common(5)],
    }


def run_sftune(
    args,
    device,
    *,
    micro: int = 0,
    compile_: str | None = None,
    fused: str = "on",
    ac: bool = False,
    seq: int | None = None,
    batch: int | None = None,
    docs: bool = False,
    attn: str = "sdpa",
    mods: tuple[str, ...] = (),
    name: str = "",
) -> dict:
    """sftune's own build and train step, as `sftune train` runs them, on the random batches."""
    seq, batch, world = seq or args.seq, batch or args.batch, args.world
    options = dict(micro=micro, compile_=compile_, fused=fused, ac=ac, mods=mods)
    cfg = sftune_config(args, device, seq=seq, batch=batch, **options)
    mcfg = model_config(args)
    mcfg._attn_implementation = attn
    model = build_model(mcfg, device, args.dtype, seed=0)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    if cfg.adapter.qlora:
        quantize_4bit(model)
    if cfg.adapter.lora or cfg.adapter.qlora:
        torch.manual_seed(1)  # the same initial adapters as the PEFT runs
        lora.apply_lora(model, cfg)
    built = module.build_module(cfg, model, device, world)  # --dist auto: DDP or FSDP2 on > 1
    if "ce0" in mods:
        built.module.compiled_loss = False
    optimizer, scheduler = build_optimizer(
        list(built.module.parameters()),
        cfg.optim,
        args.steps,
        device,
        compiled=module.choose_compile_step(cfg, built.sharded),
    )
    if built.fp8_all_gather:
        fp8.precompute_scales_after_steps(optimizer, built.module)
    if "dtensoropt" in mods:
        optimizer.on_local_shards = False
    per_rank = batch // world.world_size
    t_probe = time.perf_counter()
    budget = module.gpu_budget(device, cfg.model.max_memory_gib) if device.type == "cuda" else 0
    checkpointing = cfg.model.activation_checkpointing
    planned = {}
    if module.needs_memory_plan(cfg, micro or None, device):  # micro-batch or a lever auto
        plan = module.plan_memory(
            built.module,
            optimizer,
            per_rank_batch=per_rank,
            seq_length=seq,
            vocab_size=mcfg.vocab_size,
            device=device,
            budget_bytes=budget,
            checkpointing=checkpointing,
            **module.lever_settings(cfg),
            micro_batch=micro,
        )
        micro, checkpointing = plan.micro_batch, plan.checkpointing
        built.notes.append(plan.note)
        planned = plan.resolved()
    probe_s = time.perf_counter() - t_probe
    one_step = functools.partial(
        step.train_step,
        built.module,
        optimizer,
        scheduler,
        world_size=world.world_size,
        grad_clip=cfg.optim.grad_clip,
    )
    mine = [  # this rank's slice of each global batch
        {k: v[world.rank * per_rank : (world.rank + 1) * per_rank] for k, v in b.items()}
        for b in global_batches(mcfg.vocab_size, batch, seq, args.steps, docs=docs)
    ]
    losses, warmup_s, elapsed = time_steps(one_step, mine, micro, device, args.warmup)
    if name in args.profile:
        profile_steps(one_step, mine[:2], micro, device, args, name)
    if budget:  # the next run gets the whole GPU
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    step_losses = distributed.all_reduce_sum(torch.stack(losses))  # ranks hold shares
    peak = distributed.all_reduce_max(
        torch.tensor([float(torch.cuda.max_memory_allocated())], device=device)
    )
    timed = args.steps - args.warmup
    return dict(
        losses=step_losses.tolist(),
        world_size=world.world_size,
        micro_batch=micro,
        accum=per_rank // micro,
        seq_len=seq,
        batch=batch,
        tokens_per_s=batch * seq * timed / elapsed,
        timed_steps=timed,
        warmup_step_times_s=warmup_s,
        probe_s=probe_s,
        notes=list(built.notes),
        peak_memory_bytes=int(peak.item()),  # the largest of any GPU
        activation_checkpointing=checkpointing,
        # issue 26's levers as given (getattr: each comes with its own branch), then as planned
        levers={
            **{k: getattr(cfg.model, k, None) for k in LEVERS},
            **planned,
        },
        max_position_embeddings=mcfg.max_position_embeddings,
        layers=mcfg.num_hidden_layers,
        max_memory_gib=cfg.model.max_memory_gib,
        docs=docs,
        attn=attn,
        dist=built.dist,
        reshard_after_forward=built.reshard_after_forward,
        allocator=allocator_stats(),
        dynamo=dynamo_stats(),
    )


def quantize_4bit(model) -> None:
    """The decoder blocks' linears as bitsandbytes 4-bit NF4 (double quantization, bf16
    compute), in place: what `sftune train --qlora` loads through from_pretrained, done here on
    the random-init model (no 16 GB checkpoint to write and read back)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                setattr(parent, name, q.to(child.weight.device))  # quantizes on the move
    model.is_loaded_in_4bit = True  # peft then wraps the 4-bit layers with its bnb LoRA
    torch.cuda.empty_cache()


def run_peft(args, device, *, micro: int, ac: bool, qlora: bool = False) -> dict:
    """The plain PEFT + Hugging Face loop that TRL wraps: get_peft_model on the same model and
    initial adapters, full logits + cross-entropy per micro-batch (divided by the accumulation
    count), fused torch AdamW on the adapters, the same warmup + cosine schedule."""
    from peft import LoraConfig, get_peft_model

    mcfg = model_config(args)
    model = build_model(mcfg, device, args.dtype, seed=0)
    if qlora:
        quantize_4bit(model)
    torch.manual_seed(1)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    model = get_peft_model(model, config)
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=True)
    warm = warmup_steps(args.steps, 0.03)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warm, 0.0))
    accum = args.batch // micro

    def one_step(mbs):
        total = torch.zeros((), device=device)
        for mb in mbs:
            logits = model(input_ids=mb["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), mb["labels"].flatten()
            )
            (loss / accum).backward()
            total += loss.detach() / accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return (total,)

    batches = global_batches(mcfg.vocab_size, args.batch, args.seq, args.steps)
    losses, warmup_s, elapsed = time_steps(one_step, batches, micro, device, args.warmup)
    timed = args.steps - args.warmup
    return dict(
        losses=torch.stack(losses).tolist(),
        world_size=1,
        micro_batch=micro,
        accum=accum,
        seq_len=args.seq,
        batch=args.batch,
        tokens_per_s=args.batch * args.seq * timed / elapsed,
        timed_steps=timed,
        warmup_step_times_s=warmup_s,
        peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
        notes=[
            f"PEFT {'QLoRA' if qlora else 'LoRA'} r {LORA_R}, all-linear"
            f"{', checkpointing' if ac else ''}"
        ],
    )


def time_steps(one_step, batches, micro, device, warmup) -> tuple[list, list[float], float]:
    """Every batch as one optimizer step: (loss tensors, seconds of each warm-up step, seconds
    of the steps after the warm-up). The host waits for the GPU only around the warm-up."""
    torch.cuda.reset_peak_memory_stats()
    losses, warmup_s = [], []
    for i, b in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_accumulated_memory_stats()
            t0 = time.perf_counter()
        w0 = time.perf_counter()
        losses.append(one_step(_split(b, micro, device))[0])
        if i < warmup:
            torch.cuda.synchronize()
            warmup_s.append(time.perf_counter() - w0)
    torch.cuda.synchronize()
    return losses, warmup_s, time.perf_counter() - t0


def profile_steps(one_step, batches, micro, device, args, name) -> None:
    """Two more steps under torch.profiler: kernel time by category, top kernels, GPU idle."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            one_step(_split(b, micro, device))
        torch.cuda.synchronize()
    # GPU-side events, less the spans of record_function annotations (e.g. the whole
    # "Optimizer.step" range), which would count their kernels twice.
    events = prof.events()
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
    ]
    # The kernels that FP8 matmuls launched (eager or from a compiled graph, both go through
    # aten::_scaled_mm), so that the table can count them apart from the bf16 GEMMs.
    fp8_gemms = {k.name for e in events if e.name == "aten::_scaled_mm" for k in e.kernels}
    text = profile_table(kernels, len(batches), name, fp8_gemms)
    ops = prof.key_averages()
    tables = []
    for key in ("self_cpu_time_total", "self_device_time_total"):
        try:
            table = ops.table(sort_by=key, row_limit=40, max_name_column_width=60)
        except Exception as e:  # a key this torch does not know: the other table still comes
            table = f"({type(e).__name__}: {e})"
        tables.append(
            f"operators by {key} (torch.profiler key_averages, {len(batches)} steps)\n{table}"
        )
    if args.world.is_main:
        print(text, flush=True)
        if args.out:
            path = Path(args.out).parent / f"profile_{name.replace('+', '_')}.txt"
            path.write_text("\n\n".join([text, *tables]) + "\n")


def profile_table(kernels, steps: int, name: str, fp8_gemms: frozenset | set = frozenset()) -> str:
    """GPU busy and idle time over the kernels' span, kernel time by category, top kernels."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in spans:  # union of kernel intervals
        if cur_e is None or a > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    wall = spans[-1][1] - spans[0][0] if spans else 0.0
    by_cat: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        cat = "gemm (fp8)" if e.name in fp8_gemms else kernel_category(e.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
        rec = by_name.setdefault(e.name, [0.0, 0, cat])
        rec[0] += us
        rec[1] += 1
    total = sum(by_cat.values())
    lines = [
        f"{name}: {steps} steps, GPU span {wall / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms "
        f"(idle {100 * (1 - busy / max(wall, 1)):.1f}%), kernel time {total / 1e3:.1f} ms",
        "",
        "category            ms/step   share",
    ]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:18s} {us / 1e3 / steps:8.1f}  {100 * us / total:5.1f}%")
    lines += [
        "",
        "top kernels                                                     ms/step  calls  cat",
    ]
    for kname, (us, n, cat) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{kname[:64]:64s} {us / 1e3 / steps:7.1f} {n:6d}  {cat}")
    return "\n".join(lines)


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_", "gemv")):
        return "gemm"
    if n.startswith("triton"):
        return "triton (compiled)"
    if any(k in n for k in ("multi_tensor", "adam", "optimizer")):  # bitsandbytes: kOptimizer...
        return "optimizer/foreach"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "reduce" in n:
        return "eager reduction"
    if "elementwise" in n or "vectorized" in n:
        return "eager elementwise"
    if "embedding" in n or "index" in n or "scatter" in n or "gather" in n or "sort" in n:
        return "embedding/index"
    return "other"


def dispatch(name: str, args, device) -> dict:
    base, *mods = name.split("+")
    if name.startswith("peft-mb"):
        micro, *peft_mods = name.removeprefix("peft-mb").split("+")
        if set(peft_mods) - {"ac", "qlora"}:
            raise SystemExit(f"peft runs take +ac and +qlora only: {name!r}")
        return run_peft(
            args, device, micro=int(micro), ac="ac" in peft_mods, qlora="qlora" in peft_mods
        )
    if mods:
        micro = {"sftune": 0, "lean": 8}.get(base)
        if micro is None and base.startswith("sftune-mb"):
            micro = int(base.removeprefix("sftune-mb"))
        if micro is None:
            raise SystemExit(f"modifiers apply to sftune, sftune-mbN and lean only: {name!r}")
        if base == "lean":
            mods = ["budget0.8", *mods]
        with allocator(tuple(mods)):
            return run_sftune(args, device, micro=micro, mods=tuple(mods), name=name)
    if name == "baseline":
        return run_baseline(args, device)
    if name == "sftune":
        return run_sftune(args, device, name=name)
    if name.startswith("sftune-mb"):
        return run_sftune(args, device, micro=int(name.removeprefix("sftune-mb")), name=name)
    if name.startswith("plain-mb"):
        return run_sftune(
            args, device, micro=int(name.removeprefix("plain-mb")), compile_="off", fused="off"
        )
    if name == "lean":
        return run_sftune(args, device, micro=8, mods=("budget0.8",), name=name)
    if name == "lean-ac":
        return run_sftune(args, device, micro=8, ac=True, name=name)
    for prefix, attn in (("doc", "sdpa"), ("flex", "flex_attention")):
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
            seq = int(name.removeprefix(prefix))
            batch = max(1, args.batch * args.seq // seq)
            return run_sftune(
                args, device, seq=seq, batch=batch, docs=True, attn=attn, micro=batch, name=name
            )
    raise SystemExit(f"unknown run {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="llama3.1-8b", choices=sorted(CONFIGS))
    ap.add_argument("--runs", default="baseline,sftune")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--max-pos",
        type=int,
        default=0,
        help="the model's max_position_embeddings (default: its own)",
    )
    ap.add_argument(
        "--layers", type=int, default=0, help="only the first N decoder blocks (default: all)"
    )
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="per GPU")
    ap.add_argument("--compile", default="on", choices=["on", "off"], help="for sftune runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default="", help="comma-separated run names to profile")
    ap.add_argument("--reference", default="baseline", help="the run the others are compared with")
    args = ap.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    # A process group even for one process without torchrun: +ddp and +fsdp need one.
    args.world = distributed.init(args.device, group=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    device = (
        torch.device(args.device, args.world.local_rank)
        if args.device == "cuda"
        else torch.device("cpu")
    )
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # the harness' CUDA calls become no-ops for the smoke test
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.empty_cache = lambda *a, **k: None
        torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
        torch.cuda.reset_accumulated_memory_stats = lambda *a, **k: None
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "max_position_embeddings": model_config(args).max_position_embeddings,
        "layers": model_config(args).num_hidden_layers,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "runs": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    main_rank = args.world.is_main
    runs = args.runs.split(",")
    if args.world.distributed and "baseline" in runs:
        runs.remove("baseline")  # the course loop is single-GPU
    report = print if main_rank else (lambda *a, **k: None)
    precision_casts = torch._inductor.config.emulate_precision_casts  # rowwise FP8 sets it
    for name in runs:
        # Compiled graphs are reused across models of one shape: start each run from scratch so
        # that its own compile settings take effect (and the last model is not pinned).
        torch._dynamo.reset()
        torch._inductor.config.emulate_precision_casts = precision_casts
        torch._dynamo.utils.counters.clear()
        if device.type == "cuda":
            _free()
            if main_rank:
                print(
                    f"[{name}] start, {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True
                )
        start = time.perf_counter()
        try:
            res = dispatch(name, args, device)
        except Exception as e:  # one failed lever must not lose the other measurements
            if main_rank:
                traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        res["wall_s"] = time.perf_counter() - start
        if "tokens_per_s" in res:
            fpt = model_flops_per_token(model_config(args), res["seq_len"])
            causal = causal_flops_per_token(model_config(args), res["seq_len"])
            res["tokens_per_s_per_gpu"] = res["tokens_per_s"] / args.world.world_size
            res["mfu"] = mfu(res["tokens_per_s_per_gpu"], fpt, args.peak_flops)
            res["mfu_causal"] = mfu(res["tokens_per_s_per_gpu"], causal, args.peak_flops)
            res["peak_gib"] = (res["peak_memory_bytes"] or 0) / 2**30
            report(
                f"{name:>14}: {res['tokens_per_s']:>9,.0f} tok/s  MFU {100 * res['mfu']:5.1f}% "
                f"(causal {100 * res['mfu_causal']:5.1f}%)  "
                f"peak {res['peak_gib']:6.1f} GiB  micro {res['micro_batch']} x {res['accum']}  "
                f"seq {res['seq_len']}  losses {' '.join(f'{x:.4f}' for x in res['losses'][:6])} ...",
                flush=True,
            )
        else:
            report(f"{name:>14}: FAILED {res['error']}", flush=True)
        results["runs"][name] = res
        if args.out and main_rank:
            Path(args.out).write_text(json.dumps(results, indent=1))
    ref = args.reference
    base = results["runs"].get(ref, {})
    results["reference"] = ref
    what = "the course loop" if ref == "baseline" else ref
    for name, res in results["runs"].items():
        if name != ref and "tokens_per_s" in res and "tokens_per_s" in base:
            n = min(len(res["losses"]), len(base["losses"]))
            diff = max(
                abs(a - b) for a, b in zip(res["losses"][:n], base["losses"][:n], strict=True)
            )
            res["speedup_vs_reference"] = res["tokens_per_s"] / base["tokens_per_s"]
            res["max_loss_diff_vs_reference"] = diff if res["seq_len"] == base["seq_len"] else None
            report(
                f"{name:>14}: {res['speedup_vs_reference']:.2f}x {what}; "
                f"max |loss - {ref}| over {n} steps = {diff:.4f}"
                if res["seq_len"] == base["seq_len"]
                else f"{name:>14}: {res['speedup_vs_reference']:.2f}x (different sequence length)"
            )
    if args.out and main_rank:
        Path(args.out).write_text(json.dumps(results, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main()
