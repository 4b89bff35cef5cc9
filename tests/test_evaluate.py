"""Validation and `sftune eval --data`: the pass covers the first K sequences whatever the
micro-batch size and the number of ranks, so its loss is the same under any layout (fp64);
`sftune eval --data` packs at the length the model was tuned at and says so; a pass over no
scored token, and negative counts, are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train.distributed import World
from sftune.train.loop import train
from sftune.train.metrics import read_metrics
from trainutil import tiny_config

# fp64 forwards of the same sequences in other batch shapes agree to ~1e-15 relative.
FP64_REL = 1e-12


def _val_losses(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


def test_validation_loss_does_not_depend_on_the_micro_batch(workdir, tmp_path):
    """The issue's case: micro-batch 8 and 2 validate on the same 5 sequences (not 5 micro-
    batches' worth), at step 0 and after the run, to fp64 rounding."""
    over = dict(val_data=str(workdir / "train.jsonl"), eval_max_sequences=5, eval_every=2)
    a = train(tiny_config(workdir, tmp_path / "a", micro_batch_size=8, **over)).output_dir
    b = train(tiny_config(workdir, tmp_path / "b", micro_batch_size=2, **over)).output_dir
    va, vb = _val_losses(a), _val_losses(b)
    assert sorted(va) == sorted(vb) == [0, 2, 4]
    for step in va:
        assert vb[step] == pytest.approx(va[step], rel=FP64_REL), step
    saved = config_mod.from_dict(__import__("yaml").safe_load((a / "config.yaml").read_text()))
    assert saved.log.eval_max_sequences == 5


def test_two_ranks_score_the_sequences_one_process_scores(workdir):
    """Rank r of W scores sequences r, r + W, ... of the first K: the two ranks' sums (what
    the all-reduce adds) are one process's, at any micro-batch size, padding forwards adding 0."""
    from sftune.data import PackedSFTDataset
    from sftune.models import load_model_and_tokenizer
    from sftune.train.evaluate import evaluate
    from sftune.train.module import CausalLMWithLoss

    cpu = torch.device("cpu")
    lm, tok, _ = load_model_and_tokenizer(str(workdir / "model"), device=cpu, dtype="fp64")
    data = PackedSFTDataset(tok, workdir / "train.jsonl", 32, False, verbose=False)
    module = CausalLMWithLoss(lm, fused=False)
    one, one_tokens = evaluate(module, data, micro_batch_size=4, device=cpu, max_sequences=7)
    assert one_tokens == 7 * 32
    for micro in (1, 3):
        parts = [
            evaluate(
                module,
                data,
                micro_batch_size=micro,
                device=cpu,
                world=World(r, 2, r),
                max_sequences=7,
            )
            for r in (0, 1)
        ]
        tokens = sum(t for _, t in parts)
        assert tokens == one_tokens  # 4 + 3 sequences of 32 trained tokens
        assert sum(loss * t for loss, t in parts) / tokens == pytest.approx(one, rel=FP64_REL)


def test_the_old_name_is_refused_with_the_new_one(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    with pytest.raises(ConfigError, match="--eval-max-batches is now --eval-max-sequences"):
        config_mod.from_args(parser.parse_args(["--eval-max-batches", "4"]))
    for text in ("eval_max_batches: 4\n", "log: {eval_max_batches: 4}\n"):
        f = tmp_path / "run.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match="run.yaml: --eval-max-batches is now"):
            config_mod.from_args(parser.parse_args(["--config", str(f)]))
    # A run saved before the rename still resumes and exports: its saved cap is dropped.
    saved = config_mod.RunConfig().to_dict()
    saved["log"]["eval_max_batches"] = 16
    del saved["log"]["eval_max_sequences"]
    assert config_mod.from_dict(saved).log.eval_max_sequences is None


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_data_packs_at_the_tuned_length(workdir, fp64_run, capsys):
    """fp64_run was tuned at 32 tokens: final/sftune.json says so and `eval --data` uses it
    (the same loss as --seq-length 32, not 512's), and names the length and why."""
    final = fp64_run / "final"
    assert json.loads((final / "sftune.json").read_text())["seq_length"] == 32
    data = str(workdir / "train.jsonl")
    code, out, err = _eval(capsys, "--model", str(final), "--data", data, "--max-sequences", "4")
    assert code == 0, err
    assert f"seq-length 32 (the model was tuned at it: {final / 'sftune.json'})" in out
    flag = _eval(
        capsys, "--model", str(final), "--data", data, "--max-sequences", "4", "--seq-length", "32"
    )
    assert "seq-length 32 (--seq-length)" in flag[1]
    result = out.splitlines()[-1]
    assert result.split(" | ")[:3] == flag[1].splitlines()[-1].split(" | ")[:3]  # loss, ppl, tokens
    code, out, _ = _eval(
        capsys, "--model", str(workdir / "model"), "--data", data, "--max-sequences", "1"
    )
    assert code == 0 and "seq-length 512 (the default: the model records no tuned length)" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "-2"], "--batch-size must be >= 0"),
        (["--max-sequences", "-1"], "--max-sequences must be >= 0"),
        (["--seq-length", "0"], "--seq-length >= 1"),
        (["--max-batches", "3"], "--max-batches is now --max-sequences"),
    ],
)
def test_bad_eval_counts_are_one_line(workdir, capsys, extra, message):
    args = ["--model", str(workdir / "model"), "--data", str(workdir / "train.jsonl"), *extra]
    code, out, err = _eval(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "perplexity" not in out


def test_a_pass_over_no_scored_token_is_refused(workdir, tmp_path, capsys):
    """The first sequence holds only a long prompt: with --train-on assistant it scores nothing
    (today: perplexity 1.000 over 0 tokens, rc 0)."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "Add these. " * 20, "response": "Done."}) + "\n")
    args = ["--model", str(workdir / "model"), "--data", str(data), "--seq-length", "32"]
    code, out, err = _eval(capsys, *args, "--train-on", "assistant", "--max-sequences", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert "long.jsonl: no scored tokens in 1 sequence(s) of 32 tokens" in err
    assert "perplexity" not in out


@pytest.mark.slow
def test_two_ranks_under_torchrun_validate_like_one_process(workdir, tmp_path):
    """The same through torchrun (gloo, DDP): 2 ranks at micro-batch 2 and one process at
    micro-batch 8 log the same validation losses over the first 5 sequences (fp64)."""
    import os
    import subprocess
    import sys

    from trainutil import FP64, train_args

    def run(out, micro: str, launcher: list[str]) -> None:
        extra = ["--micro-batch-size", micro, *FP64, "--max-steps", "2", "--eval-max-sequences"]
        extra += ["5", "--val-data", str(workdir / "train.jsonl")]
        cmd = [*launcher, "-m", "sftune", *train_args(workdir, out, *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    run(tmp_path / "two", "2", torchrun)
    run(tmp_path / "one", "8", [sys.executable])
    one, two = _val_losses(tmp_path / "one"), _val_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=FP64_REL), step
