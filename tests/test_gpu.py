"""GPU fast path keeps the loss of the plain path (skipped without CUDA).

On a CUDA machine: `python -m pytest -q tests/test_gpu.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sftune import config as config_mod
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.module import build_module, probe_micro_batch
from sftune.train.optim import build_optimizer
from sftune.train.step import train_step
from tiny import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB, SEQ, BATCH, STEPS = 2048, 256, 8, 6

needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9)
    or importlib.util.find_spec("torchao") is None,
    reason="needs FP8 tensor cores (compute capability 8.9+) and torchao",
)


def _batches(docs: bool, steps: int = STEPS, zipf: bool = False):
    """Random tokens; zipf: drawn from a Zipf-like distribution, which a model learns within a
    few steps (a falling loss, so that runs compared on it must also learn alike)."""
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, VOCAB + 1) ** 1.1
    weights = weights[torch.randperm(VOCAB, generator=g)]
    out = []
    for _ in range(steps):
        if zipf:
            flat = torch.multinomial(weights, BATCH * (SEQ + 1), replacement=True, generator=g)
            stream = flat.view(BATCH, SEQ + 1)
        else:
            stream = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        b = {"input_ids": stream[:, :-1], "labels": stream[:, 1:].clone()}
        b["labels"][:, :40] = -100  # uneven trained-token counts per micro-batch
        b["labels"][::3, :100] = -100
        if docs:
            pos = torch.arange(SEQ).repeat(BATCH, 1)
            pos[:, 100:] -= 100
            pos[:, 180:] -= 80
            b["position_ids"] = pos
        out.append(b)
    return out


def _losses(
    micro: int,
    compile_: str,
    fused: str,
    attn: str = "sdpa",
    docs: bool = False,
    fp8: str = "off",
    steps: int = STEPS,
    zipf: bool = False,
    dist: str = "auto",
    probe: bool = False,
) -> list[float]:
    device = torch.device("cuda")
    model = build_tiny_model(
        VOCAB, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512, seed=0
    )
    model = model.to(device=device, dtype=torch.bfloat16)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    cfg = config_mod.from_flat(
        dict(
            seq_length=SEQ,
            batch_size=BATCH,
            micro_batch_size=micro,
            lr=1e-3,
            compile=compile_,
            fused_loss=fused,
            fp8=fp8,
            fp8_linears="all",  # (the default) auto would keep this small model's in bf16
            device="cuda",
            dist=dist,
        )
    )
    module = build_module(cfg, model, device, World()).module
    opt, sched = build_optimizer(list(module.parameters()), cfg.optim, steps, device)
    if probe:  # finds a micro-batch without changing the weights; the run keeps `micro`
        kw = dict(per_rank_batch=BATCH, seq_length=SEQ, vocab_size=VOCAB, device=device)
        assert probe_micro_batch(module, opt, **kw) == BATCH
    out = []
    for b in _batches(docs, steps, zipf):
        mbs = [
            {k: v[i : i + micro].to(device) for k, v in b.items()} for i in range(0, BATCH, micro)
        ]
        loss, _, _, _ = train_step(module, opt, sched, mbs, grad_clip=cfg.optim.grad_clip)
        out.append(float(loss))
    return out


def test_fast_path_matches_plain_path():
    plain = _losses(micro=2, compile_="off", fused="off")
    fast = _losses(micro=8, compile_="on", fused="on")
    assert fast == pytest.approx(plain, rel=2e-2), (plain, fast)


def test_ddp_and_fsdp_on_one_gpu_train_like_one_process():
    """--dist ddp and --dist fsdp in one process (a one-process NCCL group), compiled and
    fused, with accumulation: the losses of the plain module; DDP's probe leaves no
    all-reduce pending."""
    plain = _losses(micro=4, compile_="on", fused="on")
    distributed.init("cuda", group=True)
    try:
        ddp = _losses(micro=4, compile_="on", fused="on", dist="ddp", probe=True)
        fsdp = _losses(micro=4, compile_="on", fused="on", dist="fsdp")
    finally:
        distributed.shutdown()
    assert ddp == pytest.approx(plain, rel=1e-2), (plain, ddp)
    assert fsdp == pytest.approx(plain, rel=1e-2), (plain, fsdp)


def test_document_mask_sdpa_and_flex_agree():
    sdpa = _losses(micro=4, compile_="off", fused="on", docs=True)
    flex = _losses(micro=4, compile_="off", fused="on", attn="flex_attention", docs=True)
    assert flex == pytest.approx(sdpa, rel=2e-2), (sdpa, flex)
    nodoc = _losses(micro=4, compile_="off", fused="on", docs=False)
    assert nodoc[0] != pytest.approx(sdpa[0], rel=1e-6)  # the mask changes the first loss


def test_evaluation_loss_matches_training_loss():
    """Under no_grad the fused loss takes its loss-only path: same value as with gradients."""
    device = torch.device("cuda")
    model = build_tiny_model(VOCAB, hidden=256, layers=2, heads=8, kv_heads=4, seed=0)
    model = model.to(device=device, dtype=torch.bfloat16)
    cfg = config_mod.from_flat(dict(compile="on", fused_loss="on", device="cuda"))
    module = build_module(cfg, model, device, World()).module
    b = _batches(docs=False)[0]
    ids, labels = b["input_ids"].to(device), b["labels"].to(device)
    train = module(input_ids=ids, labels=labels)
    with torch.no_grad():
        evaluation = module(input_ids=ids, labels=labels)
    assert float(evaluation) == pytest.approx(float(train), rel=1e-3)


def _train_tiny(tmp_path, **over):
    """`train()` for 4 steps on a small Llama (width 128, every linear a multiple of 16) and an
    addition file, into tmp_path/run; `over` sets the setting under test."""
    import json

    from sftune.train.loop import train
    from tiny import byte_tokenizer, tiny_model_dir

    tiny_model_dir(tmp_path / "model", byte_tokenizer(), hidden=128, intermediate=256)
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"prompt": f"Add {i} and {i}.", "response": f"{2 * i}."}) + "\n")
    values = dict(
        model=str(tmp_path / "model"),
        train_data=str(tmp_path / "train.jsonl"),
        seq_length=64,
        batch_size=8,
        max_steps=4,
        lr=1e-3,
        num_samples=1,
        max_new_tokens=4,
        output_dir=str(tmp_path / "run"),
    )
    return train(config_mod.from_flat({**values, **over}))


def test_qlora_trains_and_merges_onto_the_bf16_base(tmp_path):
    """--qlora: a 4-bit NF4 base, adapters trained, final/adapter and a merged bf16 model."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import json

    from transformers import AutoModelForCausalLM

    result = _train_tiny(tmp_path, qlora=True)
    final = tmp_path / "run" / "final"
    assert result.val_loss_end < result.val_loss_start
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16).cuda()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16).cuda()
    ids = torch.tensor([[5, 6, 7, 8]], device="cuda")
    assert not torch.equal(merged(ids).logits, base(ids).logits)


def test_memory_plan_fits_a_capped_gpu():
    """--max-memory-gib: the allocator is capped, and the planned micro-batch (with
    checkpointing where chosen) trains within it; nothing fitting is a one-line error."""
    from sftune.errors import SftuneError
    from sftune.train.module import gpu_budget, plan_memory, probe_micro_batch

    device, seq, batch = torch.device("cuda"), 4096, 8
    model = build_tiny_model(VOCAB, hidden=256, layers=4, heads=8, kv_heads=4, seed=0)
    model = model.to(device=device, dtype=torch.bfloat16)
    cfg = config_mod.from_flat(dict(compile="off", fused_loss="off", device="cuda"))
    module = build_module(cfg, model, device, World()).module
    opt, _ = build_optimizer(list(module.parameters()), cfg.optim, 1, device)
    sizes = dict(per_rank_batch=batch, seq_length=seq, vocab_size=VOCAB, device=device)
    try:
        budget = gpu_budget(device, 0.5)
        assert budget == 2**29
        unchecked = probe_micro_batch(module, opt, budget_bytes=budget, **sizes)
        plan = plan_memory(module, opt, budget_bytes=budget, checkpointing=False, **sizes)
        assert unchecked is None or unchecked < batch / 2  # so checkpointing was considered
        # The plan leaves the model as it says (the no-checkpointing probe may differ from run
        # to run by a micro-batch step: the allocator's state is not the same twice).
        assert model.is_gradient_checkpointing == plan.checkpointing
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, VOCAB, (plan.micro_batch, seq), device=device)
        for _ in range(1 if plan.micro_batch == batch else 2):  # accumulation holds the grads
            module(input_ids=ids, labels=ids, scale=1.0 / ids.numel()).backward()
        assert torch.cuda.max_memory_allocated(device) < budget
        with pytest.raises(SftuneError, match="even at micro-batch 1"):
            plan_memory(
                module, opt, budget_bytes=gpu_budget(device, 0.01), checkpointing=True, **sizes
            )
    finally:
        model.gradient_checkpointing_disable()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


@needs_fp8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_losses_match_bf16(recipe):
    """20 steps of the compiled fast path: FP8 within 2% of bf16 at every step, on data whose
    loss falls (so FP8 must learn as bf16 does, not only start where it starts)."""
    torch._dynamo.reset()  # each run compiles its own layers, never within another's limits
    bf16 = _losses(micro=8, compile_="on", fused="on", steps=20, zipf=True)
    torch._dynamo.reset()
    fp8 = _losses(micro=8, compile_="on", fused="on", fp8=recipe, steps=20, zipf=True)
    assert bf16[-1] < 0.95 * bf16[0], bf16  # the data is being learnt
    assert fp8 == pytest.approx(bf16, rel=2e-2), (bf16, fp8)


@needs_fp8
def test_fp8_run_saves_a_plain_model(tmp_path):
    """`sftune train --fp8 tensorwise`: trains, and final/ is an ordinary bf16 model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    result = _train_tiny(tmp_path, fp8="tensorwise")
    assert result.val_loss_end < result.val_loss_start
    with safe_open(tmp_path / "run" / "final" / "model.safetensors", "pt") as f:
        saved = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert set(saved) == set(base.state_dict()) and set(saved.values()) == {"BF16"}
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert all(type(m).__name__ != "Float8Linear" for m in final.modules())
