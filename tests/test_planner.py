"""The memory planner (issue 26): which levers and micro-batch fit --max-memory-gib, driven by
made-up measurements (transforms/memplan.py is a pure function over them); plan_memory on the CPU
with the GPU's probes faked; `sftune train --plan-only` prints a plan and writes nothing."""

from __future__ import annotations

import doctest
import types

import pytest
import torch
import yaml

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import SftuneError
from sftune.train import module as module_mod
from sftune.train.module import CausalLMWithLoss
from sftune.train.optim import build_optimizer
from sftune.transforms import memplan
from sftune.transforms import offload as real_offload
from sftune.transforms.memplan import Candidate, Fit, NothingFits, candidates, decide, longest_fit
from tiny import build_tiny_model
from trainutil import train_args

GIB = 2**30
PLAIN, AC = Candidate(False, False, False), Candidate(True, False, False)
AC_TILED, OFFLOAD_TILED = Candidate(True, False, True), Candidate(True, True, True)


class Fake:
    """memplan.Measure from tables; records every call, so a test sees what was probed."""

    def __init__(self, fits=None, speeds=None, peak=None):
        self.fits, self.speeds, self.peak_of = fits or {}, speeds or {}, peak
        self.calls: list[tuple] = []

    def fit(self, cand):
        self.calls.append(("fit", cand))
        return self.fits.get(cand)

    def speed(self, cand, mb):
        self.calls.append(("speed", cand, mb))
        return self.speeds[cand]

    def peak(self, cand, seq):
        self.calls.append(("peak", cand, seq))
        return self.peak_of(seq)


def _decide(measure, per_rank=1, seq=131072, gib=24, cands=None, off=(), micro_batch=0):
    return decide(
        cands or candidates(False, "auto", "auto"),
        per_rank_batch=per_rank,
        seq_length=seq,
        budget_bytes=gib * GIB,
        measure=measure,
        settings_off=off,
        micro_batch=micro_batch,
    )


def test_doctests():
    assert doctest.testmod(memplan).failed == 0


def test_candidates_follow_the_settings():
    names = lambda *a: [c.name for c in candidates(*a)]  # noqa: E731
    assert candidates(False, "auto", "auto") == [PLAIN, AC, AC_TILED, OFFLOAD_TILED]
    # Today's defaults (both levers off): plain, then checkpointing, as before issue 26.
    assert candidates(False, "off", "off") == [PLAIN, AC]
    assert candidates(True, "off", "off") == [AC]
    assert names(False, "off", "auto") == ["plain", "checkpointing", "checkpointing + tiled MLP"]
    assert names(False, "off", "on") == ["tiled MLP", "checkpointing + tiled MLP"]
    assert names(False, "on", "on") == ["activation offload + tiled MLP"]
    assert names(False, "on", "off") == ["activation offload"]


def test_the_fastest_that_fits_wins_and_nothing_slower_is_probed():
    fake = Fake(fits={c: Fit(1, 20 * GIB) for c in (PLAIN, AC, AC_TILED, OFFLOAD_TILED)})
    choice = _decide(fake)
    assert choice.candidate == PLAIN and choice.micro_batch == 1
    assert fake.calls == [("fit", PLAIN)]  # micro-batch 1 is the whole batch: done
    assert "plain, micro-batch 1" in choice.note and "24.0 GiB at 131,072 tokens" in choice.note


def test_128k_in_24_gib_takes_offload_and_tiling_and_says_why():
    """Llama 8B QLoRA at 128K within 24 GiB: only offload + tiling fits."""
    fake = Fake(fits={OFFLOAD_TILED: Fit(1, int(21.5 * GIB))})
    choice = _decide(fake)
    assert choice.candidate == OFFLOAD_TILED and choice.micro_batch == 1
    assert [c[1] for c in fake.calls] == [PLAIN, AC, AC_TILED, OFFLOAD_TILED]
    assert not any(c[0] == "speed" for c in fake.calls)  # one fits: nothing to time
    note = choice.note
    assert "activation offload + tiled MLP, micro-batch 1" in note
    for name in ("plain", "checkpointing", "checkpointing + tiled MLP"):
        assert f"{name}: nothing fits" in note
    assert "peak 21.5 GiB" in note


def test_two_that_fit_are_timed_and_the_faster_wins():
    # Batch 16: plain fits 2 (accumulation x 8), checkpointing 16 (no accumulation).
    fits = {PLAIN: Fit(2, 20 * GIB), AC: Fit(16, 21 * GIB)}
    fast_ac = Fake(fits=fits, speeds={PLAIN: 9000.0, AC: 11000.0})
    choice = _decide(fast_ac, per_rank=16, seq=4096)
    assert choice.candidate == AC and choice.micro_batch == 16
    assert fast_ac.calls == [("fit", PLAIN), ("fit", AC), ("speed", PLAIN, 2), ("speed", AC, 16)]
    assert "11,000 tokens/s against 9,000" in choice.note
    # Checkpointing timed slower: plain stays, and the leaner levers (slower still, fitting
    # the same 16 at most) are probed, but each is timed only against the best so far once.
    slow_ac = Fake(
        fits={**fits, AC_TILED: Fit(16, 19 * GIB), OFFLOAD_TILED: Fit(16, 9 * GIB)},
        speeds={PLAIN: 9000.0, AC: 7000.0, AC_TILED: 6500.0, OFFLOAD_TILED: 6000.0},
    )
    choice = _decide(slow_ac, per_rank=16, seq=4096)
    assert choice.candidate == PLAIN and choice.micro_batch == 2
    assert [c for c in slow_ac.calls if c[0] == "speed"].count(("speed", PLAIN, 2)) == 1


def test_a_slower_lever_that_fits_no_more_is_not_timed():
    fake = Fake(fits={PLAIN: Fit(4, 20 * GIB), AC: Fit(4, 12 * GIB)})
    choice = _decide(fake, per_rank=32, seq=2048, cands=[PLAIN, AC])
    assert choice.candidate == PLAIN and not any(c[0] == "speed" for c in fake.calls)


def test_a_given_micro_batch_takes_the_first_lever_that_fits_it():
    fake = Fake(fits={AC: Fit(2, 20 * GIB), AC_TILED: Fit(2, 15 * GIB)})
    choice = _decide(fake, per_rank=16, seq=8192, micro_batch=2)
    assert choice.candidate == AC and "micro-batch 2 (as given;" in choice.note
    assert fake.calls == [("fit", PLAIN), ("fit", AC)]
    with pytest.raises(NothingFits, match="even at micro-batch 2 x 8,192 tokens"):
        _decide(Fake(peak=lambda t: None), per_rank=16, seq=8192, micro_batch=2)


def test_nothing_fits_names_the_longest_length_from_two_shorter_probes():
    """peak = 10 GiB + 0.125 MiB per token (made up): at T/2 = 128K it is 26 GiB, over the
    margin; at 64K and 32K it fits, and the longest under 92% of 24 GiB is
    (0.92 * 24 - 10) GiB / 0.125 MiB = 98,959 -> 98,304 tokens."""
    a, b = 10 * GIB, 2**17
    fake = Fake(peak=lambda t: a + b * t)
    with pytest.raises(NothingFits) as e:
        _decide(fake, seq=262144)
    assert longest_fit([(65536, a + b * 65536), (131072, a + b * 131072)], 24 * GIB) == 98304
    msg = e.value.message
    assert "\n" not in msg
    assert "even at micro-batch 1 x 262,144 tokens with activation offload + tiled MLP" in msg
    assert "about 98,304 tokens" in msg and "--seq-length 98304" in msg
    assert "10.0 GiB + 0.125 MiB per token, fitted to probes at 32,768 and 65,536" in msg
    assert "22.0 GiB at 98,304, probed" in msg
    # Probed with the leanest candidate, at T/2, T/4, T/8, after every fit failed; then at
    # the length the line gives.
    assert [c for c in fake.calls if c[0] == "peak"] == [
        ("peak", OFFLOAD_TILED, 131072),
        ("peak", OFFLOAD_TILED, 65536),
        ("peak", OFFLOAD_TILED, 32768),
        ("peak", OFFLOAD_TILED, 98304),
    ]


def test_a_line_that_overestimates_falls_back_to_the_longest_probed():
    """Peaks that grow faster than the line (made up: quadratic past 64K): the estimate is
    probed, does not fit, and the longest length that did is named."""
    a, b = 10 * GIB, 2**17
    fake = Fake(peak=lambda t: a + b * t + (0 if t <= 65536 else 10 * GIB))
    with pytest.raises(NothingFits) as e:
        _decide(fake, seq=262144)
    assert "about 65,536 tokens" in e.value.message
    assert "98,304 itself did not fit" in e.value.message


def test_nothing_fits_halves_until_two_lengths_fit():
    a, b = 10 * GIB, 2**20  # 1 MiB per token: 16K is over the margin (26 GiB)
    fake = Fake(peak=lambda t: a + b * t if t <= 16384 else None)
    with pytest.raises(NothingFits) as e:
        _decide(fake, seq=131072, off=("--activation-offload auto",))
    assert [c[2] for c in fake.calls if c[0] == "peak"] == [65536, 32768, 16384, 8192, 4096, 12288]
    assert "about 12,288 tokens" in e.value.message  # (22.08 - 10) GiB / 1 MiB = 12,369
    assert e.value.message.endswith("; or try --activation-offload auto")


def test_nothing_fits_at_all_says_the_model_alone_is_too_large():
    fake = Fake(peak=lambda t: None)
    with pytest.raises(NothingFits, match="weights and optimizer state alone leave no room"):
        _decide(fake, seq=65536)


# ----------------------------------------------------------------------------- plan_memory


def _checkpointed(model) -> bool:
    return all(layer.gradient_checkpointing for layer in model.model.layers)


@pytest.fixture
def fake_gpu(monkeypatch):
    """plan_memory on the CPU: the peak of a pass is made up from the levers on the model
    (stand-in offload and tiling modules that only flag it), past the budget an OOM."""
    state = {"peak": 0}
    flags = {"offload": False, "tile": 0, "before": False, "keep": 0, "host": 1000 * GIB}
    gib = GIB

    def fwd_bwd(module, ids):
        t = ids.numel()
        if flags["offload"]:
            per_token = 0.25 if flags["tile"] else 0.5
        elif _checkpointed(module.lm):
            per_token = 1 if flags["tile"] else 3
        else:
            per_token = 4
        peak = 4 * gib + per_token * t * 2**20
        state["peak"] = max(state["peak"], peak)
        if peak > 24 * gib:
            raise torch.cuda.OutOfMemoryError("fake")

    offload = types.ModuleType("sftune.transforms.offload")

    def apply_offload(hf, on, keep=0, compile_layers=False):
        # As offload.apply: the layers checkpointed while on, their earlier state back after.
        if on and not flags["offload"]:
            flags["before"] = hf.model.layers[0].gradient_checkpointing
        for layer in hf.model.layers:
            layer.gradient_checkpointing = True if on else flags["before"]
        flags["offload"], flags["keep"] = on, keep if on else 0
        return "offload"

    offload.apply = apply_offload
    offload.enabled = lambda hf: flags["offload"]
    offload.kept = lambda hf: flags["keep"]
    # A layer input of 1/8 MiB per token (4 GiB at 32K); the host's memory as flags say.
    offload.layer_input_bytes = lambda hf, mb, seq: mb * seq * 2**17
    offload.host_available = lambda: flags["host"]
    offload.host_room = real_offload.host_room
    tiling = types.ModuleType("sftune.transforms.tiling")
    tiling.apply = lambda hf, chunk: flags.update(tile=chunk) or "tiling"
    tiling.default_chunk = lambda hidden, inter, seq: 512
    tiling.enabled = lambda hf: bool(flags["tile"])
    # The planner's module reads them as module attributes (imported at its top).
    monkeypatch.setattr(module_mod, "offload", offload)
    monkeypatch.setattr(module_mod, "tiling", tiling)
    monkeypatch.setattr(module_mod, "_fwd_bwd", fwd_bwd)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = build_tiny_model(32, seed=3)
    cfg = config_mod.from_flat({"device": "cpu"})
    opt, _ = build_optimizer(list(model.parameters()), cfg.optim, 1, torch.device("cpu"))
    module = CausalLMWithLoss(model, fused=False)

    def plan(seq, per_rank_batch=1, **levers):
        return module_mod.plan_memory(
            module,
            opt,
            per_rank_batch=per_rank_batch,
            seq_length=seq,
            vocab_size=32,
            device=torch.device("cpu"),
            budget_bytes=24 * gib,
            checkpointing=False,
            **levers,
        )

    return types.SimpleNamespace(plan=plan, flags=flags, model=model)


def test_plan_memory_applies_the_chosen_levers(fake_gpu):
    """4 GiB + 4 MiB/token plain, 3 with checkpointing, 1 tiled, 0.25 offloaded + tiled: at
    8K tokens checkpointing + tiling fits 24 GiB (12 GiB), at 32K only offload + tiling."""
    plan = fake_gpu.plan(8192, offload="auto", tiled_mlp="auto")
    assert (plan.checkpointing, plan.offload, plan.tiled_chunk) == (True, False, 512)
    assert _checkpointed(fake_gpu.model) and fake_gpu.flags["tile"] == 512
    assert plan.resolved().get("tiled_mlp", "on") == "on"
    assert "checkpointing + tiled MLP, micro-batch 1" in plan.note
    assert "MLP tiles of 512 tokens" in plan.note
    plan = fake_gpu.plan(32768, offload="auto", tiled_mlp="auto")
    assert (plan.checkpointing, plan.offload, plan.tiled_chunk) == (True, True, 512)
    assert fake_gpu.flags["offload"] and _checkpointed(fake_gpu.model)
    # Back to a short length: plain fits, every lever is undone.
    plan = fake_gpu.plan(1024, offload="auto", tiled_mlp="auto")
    assert (plan.checkpointing, plan.offload, plan.tiled_chunk) == (False, False, 0)
    assert not fake_gpu.flags["offload"] and not fake_gpu.flags["tile"]
    assert not _checkpointed(fake_gpu.model)


def test_plan_memory_with_offload_auto_keeps_what_the_gpu_holds(fake_gpu):
    """Offload + tiling at 32K peaks at 4 GiB + 32K x 0.25 MiB = 12 GiB, 10.1 GiB under 92%
    of 24 GiB: two inputs of 4 GiB, less one for the prefetch, so the last of the 2 layers
    keeps its input; the host then holds the other's 4 GiB. With --activation-offload on the
    planner leaves the keep given (0 here)."""
    plan = fake_gpu.plan(32768, offload="auto", tiled_mlp="auto")
    assert (plan.offload, plan.offload_keep, fake_gpu.flags["keep"]) == (True, 1, 1)
    assert plan.resolved()["activation_offload_keep"] == 1
    assert "keeps the last 1 of 2 layer inputs on the GPU" in plan.note
    assert "4.0 GiB on the host" in plan.note and "1000.0 GiB available" in plan.note
    fake_gpu.flags["keep"] = 0  # as build_module applies --activation-offload on, keep 0
    plan = fake_gpu.plan(32768, offload="on", tiled_mlp="auto")
    assert (plan.offload, plan.offload_keep) == (True, 0) and "keeps the last" not in plan.note
    # A host with 6 GiB available (3 usable: no 4 GiB input fits) and a GPU that keeps one
    # input: never more host memory than available, so a one-line error.
    fake_gpu.flags["host"] = 6 * GIB
    with pytest.raises(SftuneError) as e:
        fake_gpu.plan(32768, offload="auto", tiled_mlp="auto")
    assert "holds only 0 of the 2 layer inputs and the GPU's headroom only 1" in str(e.value)
    assert "\n" not in str(e.value)


def test_choose_keep_from_made_up_measurements():
    """Llama 3 8B at 512K: inputs of 4 GiB; the GPU's headroom and the host's room decide."""
    per = 4 * GIB
    assert memplan.choose_keep(32, per, 30 * GIB, 1000 * GIB).keep == 6  # 7 - 1 (prefetch)
    assert memplan.choose_keep(32, per, 3 * GIB, 1000 * GIB).keep == 0  # no room: all out
    assert memplan.choose_keep(32, per, 500 * GIB, 0).keep == 32  # everything stays
    got = memplan.choose_keep(32, per, 30 * GIB, 107 * GIB)  # the host holds 26 (104 GiB)
    assert (got.keep, got.host_bytes) == (6, 104 * GIB)
    assert "last 6 of 32" in got.note and "104.0 GiB on the host" in got.note
    got = memplan.choose_keep(32, per, 84 * GIB, 100 * GIB, ranks=2)  # 2 ranks: 8 GiB a layer
    assert (got.keep, got.host_bytes) == (20, 12 * 8 * GIB)
    with pytest.raises(NothingFits, match="holds only 13 of the 32 layer inputs"):
        memplan.choose_keep(32, per, 30 * GIB, 107 * GIB, ranks=2)


def test_plan_memory_plans_the_levers_for_a_given_micro_batch(fake_gpu):
    """--micro-batch-size 2 of 4 with the levers auto: 2 x 8K tokens fit only tiled
    (4 GiB + 16K x 1 MiB = 20 GiB), measured over two passes as accumulation runs them."""
    plan = fake_gpu.plan(8192, per_rank_batch=4, micro_batch=2, offload="auto", tiled_mlp="auto")
    assert (plan.micro_batch, plan.checkpointing, plan.offload, plan.tiled_chunk) == (
        2,
        True,
        False,
        512,
    )
    assert "micro-batch 2 (as given;" in plan.note


def test_needs_memory_plan_on_a_gpu_only():
    cfg = config_mod.from_flat({"micro_batch_size": 2})
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert module_mod.needs_memory_plan(cfg, None, gpu)
    assert not module_mod.needs_memory_plan(cfg, None, cpu)
    assert not module_mod.needs_memory_plan(cfg, 2, gpu)  # levers off (their default)


def test_plan_memory_nothing_fits_is_one_line_with_the_longest_length(fake_gpu):
    """Levers off (today's defaults): checkpointing's 3 MiB/token, probed at 32K, 16K, 8K
    (each over), 4K and 2K, fits (0.92 x 24 - 4) GiB / 3 MiB = 6,171 tokens -> 6,144; the error
    also says which levers would help."""
    with pytest.raises(SftuneError) as e:
        fake_gpu.plan(65536, offload="off", tiled_mlp="off")
    msg = str(e.value)
    assert "\n" not in msg and "even at micro-batch 1 x 65,536 tokens with checkpointing" in msg
    assert "about 6,144 tokens" in msg and "probes at 2,048 and 4,096 tokens" in msg
    assert msg.endswith("or try --activation-offload auto and --tiled-mlp auto")


def test_expandable_segments_are_read_as_sftune_train_sets_them(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert module_mod.expandable_segments()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert not module_mod.expandable_segments()


# ----------------------------------------------------------------------------- --plan-only


def test_plan_only_prints_the_plan_and_writes_nothing(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*train_args(workdir, out, "--micro-batch-size", "4"), "--plan-only"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert not out.exists()  # no run directory, not even its lock or config.yaml
    assert "micro-batch 4" in stdout and "plan only: nothing trained, nothing written" in stdout
    resolved = yaml.safe_load(stdout.split("its resolved config:\n", 1)[1])
    assert resolved["optim"]["micro_batch_size"] == 4
    assert resolved["log"]["plan_only"] is False  # the config that trains this plan
    assert resolved["model"]["device"] == "cpu"


def test_plan_memory_with_the_real_levers_changes_no_gradient(monkeypatch):
    """Once the offload and tiling modules are merged (skipped before): the planner switches
    the real levers on and off across plans (peaks made up from their state), the model is
    left as each plan says, and its gradients stay those of the plain model, in fp64."""
    offload = pytest.importorskip("sftune.transforms.offload")
    tiling = pytest.importorskip("sftune.transforms.tiling")
    from trainutil import FP64_ATOL, FP64_RTOL

    real, state = module_mod._fwd_bwd, {"peak": 0}

    def fwd_bwd(module, ids):
        hf = module.lm
        if offload.enabled(hf):
            per_token = 0.25 if tiling.enabled(hf) else 0.5
        elif module_mod.current_levers(hf).checkpointing:
            per_token = 1 if tiling.enabled(hf) else 3
        else:
            per_token = 4
        state["peak"] = peak = 4 * GIB + per_token * ids.numel() * 2**20
        if peak > 24 * GIB:
            raise torch.cuda.OutOfMemoryError("fake")
        real(module, ids[:, :64])  # a real pass in this state, short

    monkeypatch.setattr(module_mod, "_fwd_bwd", fwd_bwd)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = build_tiny_model(32, seed=3, dtype=torch.float64)
    cfg = config_mod.from_flat({"device": "cpu"})
    opt, _ = build_optimizer(list(model.parameters()), cfg.optim, 1, torch.device("cpu"))
    module = CausalLMWithLoss(model, fused=False)
    ids = torch.randint(0, 32, (1, 64), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad(set_to_none=True)
        real(module, ids)
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    for seq, want in [
        (8192, Candidate(True, False, True)),
        (32768, Candidate(True, True, True)),
        (1024, PLAIN),
        (32768, Candidate(True, True, True)),
        (7168, Candidate(True, False, True)),
        (4096, PLAIN),
    ]:
        plan = module_mod.plan_memory(
            module,
            opt,
            per_rank_batch=1,
            seq_length=seq,
            vocab_size=32,
            device=torch.device("cpu"),
            budget_bytes=24 * GIB,
            checkpointing=False,
            offload="auto",
            tiled_mlp="auto",
            tiled_chunk=16,
        )
        assert (plan.checkpointing, plan.offload, bool(plan.tiled_chunk)) == tuple(want)
        assert module_mod.current_levers(model) == want
        for a, b in zip(grads(), plain, strict=True):
            torch.testing.assert_close(a, b, rtol=FP64_RTOL, atol=FP64_ATOL)
