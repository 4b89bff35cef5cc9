"""The trainer on tiny models: accumulation equivalence, exact kill-and-resume, faults, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftune import config as config_mod
from sftune.cli import main
from sftune.data.templates import render_alpaca
from sftune.errors import SftuneError
from sftune.train.loop import train
from sftune.train.metrics import read_metrics
from trainutil import (
    assert_same_fp64_weights,
    assert_same_losses,
    losses,
    tiny_config,
    train_args,
    weights,
)


def _cfg(workdir: Path, out: Path, **over) -> config_mod.RunConfig:
    return tiny_config(workdir, out, **over)


@pytest.mark.parametrize("response_only", [False, True])
def test_accumulation_does_not_change_the_step(workdir, tmp_path, response_only):
    """Batch 8 as 1 x 8 and as 4 x 2 (accumulation x micro-batch): same losses, same weights."""
    a = train(_cfg(workdir, tmp_path / "a", micro_batch_size=8, response_only=response_only))
    b = train(_cfg(workdir, tmp_path / "b", micro_batch_size=2, response_only=response_only))
    la, lb = losses(a.output_dir), losses(b.output_dir)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert_same_losses(la, lb)
    assert_same_fp64_weights(weights(a.output_dir), weights(b.output_dir))
    assert a.val_loss_end < a.val_loss_start


def _cli(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sftune", *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        timeout=300,
        **kw,
    )


def _train_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return train_args(workdir, out, "--micro-batch-size", "4", *extra)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sftune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(run)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(workdir, tmp_path):
    """A run killed with SIGKILL mid-epoch and resumed ends bit-identical to an uninterrupted one."""
    steps = ["--max-steps", "12", "--save-every", "3"]
    ref = _cli(*_train_args(workdir, tmp_path / "ref", *steps))
    assert ref.returncode == 0, ref.stderr
    proc = _start(_train_args(workdir, tmp_path / "cut", *steps))
    _wait_for_step(tmp_path / "cut", 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "cut" / "final").exists()
    resumed = _cli(*_train_args(workdir, tmp_path / "cut", *steps, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    # A run against itself on one machine (same kernels, same threads): bit-identical by
    # construction, so exact equality in the default dtype, not a tolerance.
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # exact, every step
    w_ref, w_cut = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(w_ref[k], w_cut[k]) for k in w_ref)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert kept == ["step_00000009", "step_00000012"]  # --keep-checkpoints 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(workdir, tmp_path):
    proc = _start(_train_args(workdir, tmp_path / "run", "--max-steps", "500"))
    _wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and "resume with --resume latest" in out + err


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """`sftune ARGS` in this process (no cold interpreter): (exit code, stdout, stderr)."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# A non-finite loss, gradient norm or weight: tests/test_guard.py.


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--micro-batch-size", "3"], "is not a multiple of --micro-batch-size 3"),
        (["--model", "no-such-preset"], "no-such-preset"),
        (["--train-data", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (["--lr", "abc"], "lr: expected float"),
        (["--dtype", "int8"], "--dtype"),
        (["--resume", "latest"], "no checkpoint"),
    ],
)
def test_bad_flags_are_one_line_errors(workdir, tmp_path, capsys, extra, message):
    # In-process; tests/test_prepare_cli.py keeps the one real-process exit-code test.
    code, _, err = _main([*_train_args(workdir, tmp_path / "run"), *extra], capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sftune: error:") and message in last, err
    assert err.count("sftune: error:") == 1 and "Traceback" not in err


def test_refuses_to_overwrite_an_earlier_run(workdir, tmp_path, capsys):
    args = _train_args(workdir, tmp_path / "run", "--max-steps", "1")
    assert _main(args, capsys)[0] == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, _, err = _main(args, capsys)
    assert code == 2 and "already holds a run" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_cli_end_to_end(workdir, tmp_path, capsys):
    """train (with a config file) -> checkpoint -> resume further -> save -> reload -> eval -> generate."""
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{model: {workdir / 'model'}}}\ndata: {{seq_length: 32}}\nlr: 3e-3\n")
    common = [
        "--config",
        str(cfg),
        "--train-data",
        str(workdir / "train.jsonl"),
        "--batch-size",
        "8",
        "--output-dir",
        str(run),
        "--num-samples",
        "1",
        "--max-new-tokens",
        "8",
    ]
    first = _cli("train", *common, "--max-steps", "3", "--save-every", "2")
    assert first.returncode == 0, first.stderr
    assert "val loss" in first.stdout and (run / "learning_curve.png").stat().st_size > 1000
    saved = config_mod.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert saved.optim.lr == 3e-3 and saved.data.seq_length == 32
    more = _cli("train", *common, "--max-steps", "5", "--resume", "latest")
    assert more.returncode == 0, more.stderr
    steps = [r["step"] for r in read_metrics(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert any("val_loss" in r for r in read_metrics(run))
    assert (run / "samples.jsonl").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2 and tok.eos_token_id is not None
    # transformers 4.x cannot load v5's "TokenizersBackend" class name.
    tok_cfg = json.loads((run / "final" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    # eval and generate in this process: the same CLI, without two more cold interpreters.
    code, out, err = _main(
        ["eval", "--model", str(run / "final"), "--data", str(workdir / "train.jsonl")]
        + ["--seq-length", "32"],
        capsys,
    )
    assert code == 0, err
    assert "perplexity" in out
    prompt = "Add 1 and 2."
    code, out, err = _main(
        ["generate", "--model", str(run / "final"), "--prompt", prompt, "--max-new-tokens", "5"],
        capsys,
    )
    assert code == 0, err
    # It prints the saved model's greedy continuation, decoded: a non-empty string.
    printed = out.removesuffix("\n")
    prompt_ids = tok(render_alpaca(prompt, "")[0], return_tensors="pt").input_ids
    ids = model.generate(
        prompt_ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id
    )
    assert printed == tok.decode(ids[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert printed


def test_finished_run_keeps_what_users_load(workdir, tmp_path):
    """A finished run without --save-every keeps final/ (world-readable under umask 022), no
    optimizer checkpoint, and a config.yaml with every "auto" resolved."""
    old = os.umask(0o022)
    try:
        r = train(_cfg(workdir, tmp_path / "run", max_steps=2, dtype="auto", micro_batch_size=0))
    finally:
        os.umask(old)
    run = r.output_dir
    assert not (run / "checkpoints").exists()
    for path in [run / "learning_curve.png", *(run / "final").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (run / "final").stat().st_mode & 0o777 == 0o755
    saved = config_mod.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert saved.data.train_data == str(workdir / "train.jsonl")
    assert saved.optim.micro_batch_size == 8 and saved.model.dtype == "fp32"
    assert saved.model.compile == "off" and saved.model.device == "cpu"
    assert saved.log.eval_max_sequences == 64  # the CPU default
    assert json.loads((run / "final" / "sftune.json").read_text()) == {
        "prompt_format": "alpaca",
        "seq_length": 32,
        "data_format": "prompt/response",
        "train_on": "all",
        "objective": "sft",
    }


def test_a_failed_build_leaves_no_run_directory(workdir, tmp_path):
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')  # line 2: no response
    out = tmp_path / "run"
    with pytest.raises(SftuneError, match="val.jsonl:2: field 'response': missing"):
        train(_cfg(workdir, out, val_data=str(bad)))
    assert not out.exists()


def test_evaluation_is_capped_and_stops_when_asked(workdir):
    """--eval-max-sequences scores the first K sequences; an interrupt stops a pass between
    two micro-batches instead of at its end."""
    from sftune.data import PackedSFTDataset
    from sftune.models import load_model_and_tokenizer
    from sftune.train.evaluate import EvalInterrupted, evaluate
    from sftune.train.module import CausalLMWithLoss

    cpu = torch.device("cpu")
    lm, tok, _ = load_model_and_tokenizer(str(workdir / "model"), device=cpu)
    data = PackedSFTDataset(tok, workdir / "train.jsonl", 32, False, verbose=False)
    module = CausalLMWithLoss(lm, fused=False)
    seen = []
    loss, tokens = evaluate(
        module,
        data,
        micro_batch_size=4,
        device=cpu,
        max_sequences=12,
        on_batch=lambda: seen.append(1),
    )
    assert len(seen) == 3 and tokens == 3 * 4 * 32
    first, _ = evaluate(module, data, micro_batch_size=4, device=cpu, max_sequences=4)
    assert first == pytest.approx(
        evaluate(module, data, micro_batch_size=2, device=cpu, max_sequences=4)[0]
    )
    asked = []
    with pytest.raises(EvalInterrupted):
        evaluate(
            module,
            data,
            micro_batch_size=4,
            device=cpu,
            stop_requested=lambda: asked.append(1) or len(asked) > 2,
        )
    assert len(asked) == 3  # two micro-batches ran, the third was not started


def test_generation_stops_where_the_answer_ends(workdir):
    from sftune.models import load_tokenizer
    from sftune.train.generate import _cut_at_stop_strings, prompt_format, stop_token_ids

    assert _cut_at_stop_strings(" 4.\n\n### Instruction:\nAdd 5 and 6.") == " 4.\n\n"
    tok = load_tokenizer(str(workdir / "model"))
    assert stop_token_ids(tok) == [tok.eos_token_id]
    assert prompt_format(None, tok) == "alpaca"  # no chat template, no sftune.json
