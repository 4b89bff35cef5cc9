"""Preference tuning in the one trainer (issue 25): `sftune train --objective dpo|ipo|simpo|orpo`
on packed pairs, with the reference's log-probs computed once and cached.

Every run here is the tiny Llama in float64 on the CPU, on arithmetic pairs ("The answer is
a+b." against a wrong sum): two pairs per 512-token row, 4 rows (8 pairs) per step.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from sftune.cli import main
from sftune.train.metrics import read_metrics
from test_resume import _interrupt_after
from trainutil import FP64, assert_same_fp64_weights, losses, train_args, weights

LN2 = math.log(2)
EXACT = 1e-12  # fp64: the policy and the reference are the same weights at step 0


def _write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            wrong = a + b + rng.randint(1, 9)
            pair = {
                "prompt": f"Add {a} and {b}.",
                "chosen": f"The answer is {a + b}.",
                "rejected": f"The answer is {wrong}.",
            }
            f.write(json.dumps(pair) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs")
    return _write_pairs(root / "train.jsonl", 64, 0), _write_pairs(root / "val.jsonl", 8, 1)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own cache: a reference cached by another test is not this test's."""
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path / "cache"))


def dpo_args(workdir, pairs, out, *extra) -> list[str]:
    train, val = pairs
    return train_args(
        workdir,
        out,
        "--train-data",
        str(train),
        "--val-data",
        str(val),
        "--objective",
        "dpo",
        "--seq-length",
        "512",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        *FP64,
        *extra,
    )


def _run(args, capsys) -> tuple[int, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


def _rows(run: Path, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if key in r}


# ----------------------------------------------------------------------------- the loss


def test_dpo_starts_at_ln2_with_zero_margins_and_logs_trl_metrics(workdir, pairs, tmp_path, capsys):
    """At step 0 the policy is the reference: loss ln 2, margins 0, accuracy 0 (a tie is no
    win), on the held-out pairs and on the first step's; then it trains, and final/ says how."""
    run = tmp_path / "run"
    code, out = _run(dpo_args(workdir, pairs, run, "--max-steps", "3"), capsys)
    assert code == 0, out
    assert "objective dpo (beta 0.1; reference the starting model" in out
    assert "reference log-probs of 64 pairs" in out and "computed" in out
    val, train = _rows(run, "val_loss"), _rows(run, "train_loss")
    assert val[0]["val_loss"] == pytest.approx(LN2, abs=EXACT)
    assert val[0]["val_rewards/margins"] == pytest.approx(0, abs=EXACT)
    assert val[0]["val_rewards/accuracies"] == 0
    first = train[1]
    assert first["train_loss"] == pytest.approx(LN2, abs=EXACT)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0, abs=EXACT), key
    assert first["rewards/accuracies"] == 0
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert first["pairs"] == 8 and train[3]["pairs"] == 24  # two pairs per row, 4 rows a step
    assert train[3]["train_loss"] < LN2 and val[3]["val_loss"] < LN2  # it learns to prefer
    meta = json.loads((run / "final" / "sftune.json").read_text())
    assert meta["objective"] == "dpo" and meta["prompt_format"] == "alpaca"


@pytest.mark.parametrize(
    "objective, start",
    [
        ("ipo", (1 / (2 * 0.1)) ** 2),  # (h - 1/(2 beta))^2 at h = 0
        ("simpo", None),  # reference-free: no fixed start
        ("orpo", None),
    ],
)
def test_the_family_trains_through_the_same_loop(
    workdir, pairs, tmp_path, capsys, objective, start
):
    run = tmp_path / objective
    code, out = _run(
        dpo_args(workdir, pairs, run, "--objective", objective, "--max-steps", "2"), capsys
    )
    assert code == 0, out
    assert ("reference log-probs" in out) == (start is not None)
    val = _rows(run, "val_loss")
    if start is not None:
        assert val[0]["val_loss"] == pytest.approx(start, abs=1e-9)
    assert all(math.isfinite(r["train_loss"]) for r in _rows(run, "train_loss").values())
    assert (run / "final" / "model.safetensors").is_file()


def _response_logps(model, encoded) -> tuple[float, float]:
    """log p(chosen | prompt), log p(rejected | prompt) of one pair as two separate sequences."""
    sums = []
    for response, mask in (
        (encoded.chosen, encoded.chosen_mask),
        (encoded.rejected, encoded.rejected_mask),
    ):
        ids = torch.tensor([encoded.prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        scored = torch.tensor(mask, dtype=torch.float64)
        sums.append(float((logps[len(encoded.prompt) - 1 :] * scored).sum()))
    return sums[0], sums[1]


def _direct_val_margin(policy_dir, ref_dir, val_path, beta=0.1) -> float:
    """The mean reward margin of the validation pairs, computed without the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.data.preference import PairEncoder, read_pairs

    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    encoder = PairEncoder(tokenizer)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()  # noqa: E731
    policy, ref = load(policy_dir), load(ref_dir)
    margins = []
    for pair in read_pairs(val_path).pairs:
        enc = encoder.encode(pair)
        (pc, pr), (rc, rr) = _response_logps(policy, enc), _response_logps(ref, enc)
        margins.append(beta * ((pc - rc) - (pr - rr)))
    return sum(margins) / len(margins)


def test_held_out_pairs_are_scored_against_the_reference_not_the_policy(
    workdir, pairs, tmp_path, capsys
):
    """TRL once scored evaluation pairs against the policy (huggingface/trl#6443), which makes
    every validation margin 0. The last validation's margin here is the trained model's against
    the starting model's, each computed as two separate sequences."""
    run = tmp_path / "run"
    code, out = _run(dpo_args(workdir, pairs, run, "--max-steps", "3", "--lr", "3e-3"), capsys)
    assert code == 0, out
    logged = _rows(run, "val_loss")[3]["val_rewards/margins"]
    direct = _direct_val_margin(run / "final", workdir / "model", pairs[1])
    assert abs(direct) > 1e-3  # the policy moved: a policy-scored margin would be 0
    assert logged == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_ref_model_scores_the_pairs_and_a_foreign_tokenizer_is_refused(
    workdir, pairs, tmp_path, capsys
):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import byte_tokenizer, tiny_model_dir

    other = tiny_model_dir(tmp_path / "other", byte_tokenizer(), seed=7)
    run = tmp_path / "run"
    code, out = _run(
        dpo_args(workdir, pairs, run, "--max-steps", "1", "--ref-model", str(other)), capsys
    )
    assert code == 0, out
    logged = _rows(run, "val_loss")[0]["val_rewards/margins"]
    assert logged == pytest.approx(
        _direct_val_margin(workdir / "model", other, pairs[1]), rel=1e-9, abs=1e-12
    )
    assert abs(logged) > 1e-3

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    foreign = tiny_model_dir(tmp_path / "foreign", tok)
    code, out = _run(
        dpo_args(workdir, pairs, tmp_path / "no", "--max-steps", "1", "--ref-model", str(foreign)),
        capsys,
    )
    assert code == 2
    line = out.strip().splitlines()[-1]
    assert line.startswith("sftune: error: --ref-model ") and "tokenizer differs" in line
    assert not (tmp_path / "no" / "final").exists()


def test_lora_dpo_references_the_base_and_saves_adapters(workdir, pairs, tmp_path, capsys):
    """With --lora the reference is the starting model without the adapters: ln 2 at step 0;
    final/ holds the merged model and adapter/, and `sftune export` of its checkpoint agrees."""
    run = tmp_path / "run"
    extra = ("--max-steps", "2", "--lora", "--lora-r", "4", "--save-every", "2")
    code, out = _run(dpo_args(workdir, pairs, run, *extra), capsys)
    assert code == 0, out
    assert "(base without adapters): computed" in out
    assert _rows(run, "val_loss")[0]["val_loss"] == pytest.approx(LN2, abs=EXACT)
    assert _rows(run, "train_loss")[1]["train_loss"] == pytest.approx(LN2, abs=EXACT)
    assert _rows(run, "train_loss")[2]["train_loss"] != pytest.approx(LN2, abs=1e-9)
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    exported = tmp_path / "exported"
    ckpt = run / "checkpoints" / "step_00000002"
    assert main(["export", str(ckpt), "--out", str(exported), "--merge"]) == 0
    from safetensors.torch import load_file

    final = weights(run)
    for key, value in load_file(exported / "model.safetensors").items():
        assert torch.equal(value, final[key]), key
    assert json.loads((exported / "sftune.json").read_text())["objective"] == "dpo"


# ----------------------------------------------------------------------------- layout and resume


def test_accumulation_does_not_change_the_dpo_step(workdir, pairs, tmp_path, capsys):
    """The step's loss is the mean over its pairs whatever the micro-batch: 4 rows at once and
    one at a time (rows holding different numbers of prompt and response tokens) train alike."""
    runs = {}
    for mb in ("4", "1"):
        run = tmp_path / f"mb{mb}"
        code, out = _run(
            dpo_args(workdir, pairs, run, "--max-steps", "3", "--micro-batch-size", mb), capsys
        )
        assert code == 0, out
        runs[mb] = run
    a, b = losses(runs["4"]), losses(runs["1"])
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-12), step
    assert_same_fp64_weights(weights(runs["4"]), weights(runs["1"]))


def test_a_resumed_dpo_run_matches_the_uninterrupted_one(
    workdir, pairs, tmp_path, capsys, monkeypatch
):
    """Interrupted after step 2 (SIGINT: a checkpoint), then resumed with the reference cache
    gone: the pass runs again on the starting weights (before the checkpoint's load) and the
    run ends with the uninterrupted run's losses and weights."""
    whole = tmp_path / "whole"
    assert _run(dpo_args(workdir, pairs, whole, "--max-steps", "4"), capsys)[0] == 0
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        code, out = _run(dpo_args(workdir, pairs, part, "--max-steps", "4"), capsys)
    assert code == 130, out
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path / "empty-cache"))
    code, out = _run(["train", "--resume", "latest", "--output-dir", str(part)], capsys)
    assert code == 0, out
    assert "reference log-probs of 64 pairs" in out and "computed" in out
    again = losses(part)
    for step in (1, 2, 3, 4):
        assert again[step] == losses(whole)[step], step
    assert_same_fp64_weights(weights(whole), weights(part))


def test_the_reference_is_cached_with_the_packed_pairs(workdir, pairs, tmp_path, capsys):
    first = _run(dpo_args(workdir, pairs, tmp_path / "a", "--max-steps", "1"), capsys)[1]
    second = _run(dpo_args(workdir, pairs, tmp_path / "b", "--max-steps", "1"), capsys)[1]
    assert "64 pairs of" in first and "from the cache" not in first
    assert second.count("from the cache") == 2  # train and validation
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    third = _run(
        dpo_args(workdir, pairs, tmp_path / "c", "--max-steps", "1", "--beta", "0.2"), capsys
    )[1]
    assert third.count("from the cache") == 2  # beta is not in the reference's key
    fourth = _run(
        dpo_args(workdir, pairs, tmp_path / "d", "--max-steps", "1", "--seq-length", "256"), capsys
    )[1]
    assert "from the cache" not in fourth  # other rows: scored again


# ----------------------------------------------------------------------------- refusals


def test_each_objective_refuses_the_other_kind_of_data(workdir, pairs, tmp_path, capsys):
    code, out = _run(
        train_args(workdir, tmp_path / "a", "--objective", "dpo", "--max-steps", "1"), capsys
    )
    assert code == 2
    line = out.strip().splitlines()[-1]
    assert "`--objective dpo` needs preference pairs" in line and "train.jsonl:1" in line
    code, out = _run(train_args(workdir, tmp_path / "b", "--train-data", str(pairs[0])), capsys)
    assert code == 2
    line = out.strip().splitlines()[-1]
    assert "preference pairs: use --objective dpo" in line and f"{pairs[0]}:1" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_refuses_to_switch_between_sft_and_dpo(workdir, pairs, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert _run(train_args(workdir, sft, "--max-steps", "1", "--save-every", "1"), capsys)[0] == 0
    code, out = _run(
        ["train", "--resume", "latest", "--output-dir", str(sft), "--objective", "dpo"], capsys
    )
    assert code == 2
    assert "--objective dpo: the run being resumed was trained with sft" in out
    dpo = tmp_path / "dpo"
    assert (
        _run(dpo_args(workdir, pairs, dpo, "--max-steps", "1", "--save-every", "1"), capsys)[0] == 0
    )
    code, out = _run(
        ["train", "--resume", "latest", "--output-dir", str(dpo), "--objective", "sft"], capsys
    )
    assert code == 2
    assert "--objective sft: the run being resumed was trained with dpo" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--objective", "simpo", "--ref-model", "x"),
            "--ref-model: --objective simpo is reference-free",
        ),
        (("--objective", "orpo", "--nll-weight", "1"), "--nll-weight: --objective orpo carries"),
        (("--objective", "dpo", "--packing", "whole"), "--packing whole: an SFT setting"),
        (("--objective", "dpo", "--beta", "0"), "--beta must be in (0, 1000], got 0"),
    ],
)
def test_settings_an_objective_does_not_read_are_refused(tmp_path, capsys, flags, message):
    code, out = _run(["train", *flags, "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and message in out, out


@pytest.mark.slow
def test_two_ranks_train_dpo_like_one(workdir, pairs, tmp_path):
    """torchrun, 2 ranks (gloo, DDP), against one process: the step's mean over its pairs is
    over both ranks' pairs, so the losses and the weights agree (fp64)."""
    import os
    import subprocess

    from test_distributed import _ok, _torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTUNE_CACHE_DIR": str(tmp_path / "cache")}

    def launch(out, launcher, *extra):
        args = dpo_args(workdir, pairs, out, "--max-steps", "3", "--micro-batch-size", "1", *extra)
        cmd = [*launcher, "-m", "sftune", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    _ok(launch(tmp_path / "one", [sys.executable]))
    notes = _ok(launch(tmp_path / "two", _torchrun(2), "--dist", "ddp"))
    assert "DDP" in notes
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-12), step
    assert_same_fp64_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


def test_fewer_rows_than_a_batch_is_one_line(workdir, pairs, tmp_path, capsys):
    code, out = _run(dpo_args(workdir, pairs, tmp_path / "x", "--batch-size", "64"), capsys)
    assert code == 2
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"sftune: error: {pairs[0]}: 32 packed row(s) of 512 tokens, fewer")
    assert not (tmp_path / "x").exists()


def test_conversational_pairs_from_a_yaml_config_train_as_chats(tmp_path, capsys):
    """Conversational pairs (the chat template renders them) from a YAML config with the
    objective's keys in their section: ln 2 at step 0, and final/ says it was tuned on chats,
    so `sftune generate` prompts it through the chat template."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import chat_model_dir

    model = chat_model_dir(tmp_path / "chat")
    rng = random.Random(2)
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            record = {
                "prompt": [{"role": "user", "content": f"Add {a} and {b}."}],
                "chosen": [{"role": "assistant", "content": f"{a + b}"}],
                "rejected": [{"role": "assistant", "content": f"{a + b + 1}"}],
            }
            f.write(json.dumps(record) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{model: {model}, dtype: fp64, device: cpu}}\n"
        f"data: {{train_data: {path}, seq_length: 256, val_fraction: 0.25}}\n"
        "loss: {objective: dpo, beta: 0.2}\n"
        "optim: {batch_size: 2, max_steps: 2, lr: 1.0e-3}\n"
        f"log: {{output_dir: {tmp_path / 'run'}, num_samples: 1, log_every: 1}}\n"
    )
    code, out = _run(["train", "--config", str(cfg)], capsys)
    assert code == 0, out
    assert "conversational pairs (detected)" in out and "beta 0.2" in out
    run = tmp_path / "run"
    assert _rows(run, "val_loss")[0]["val_loss"] == pytest.approx(LN2, abs=EXACT)
    meta = json.loads((run / "final" / "sftune.json").read_text())
    assert meta["prompt_format"] == "chat" and meta["objective"] == "dpo"
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][0]["role"] == "user" and sample["chosen"][0]["role"] == "assistant"
    code, out = _run(
        [
            "generate",
            "--model",
            str(run / "final"),
            "--prompt",
            "Add 1 and 2.",
            "--max-new-tokens",
            "4",
        ],
        capsys,
    )
    assert code == 0, out


def test_eval_scores_held_out_pairs_as_training_did(workdir, pairs, tmp_path, capsys):
    """`sftune eval --data pairs.jsonl` on final/: the objective, beta and reference from its
    sftune.json, the same val_loss, reward accuracy and margin as the run's last validation."""
    run = tmp_path / "run"
    assert _run(dpo_args(workdir, pairs, run, "--max-steps", "2"), capsys)[0] == 0
    last = _rows(run, "val_loss")[2]
    code, out = _run(["eval", "--model", str(run / "final"), "--data", str(pairs[1])], capsys)
    assert code == 0, out
    line = out.strip().splitlines()[-1]
    assert f"8 pairs | dpo (beta 0.1) against {workdir / 'model'}" in line
    values = dict(part.rsplit(" ", 1) for part in line.split(" | ")[:3])
    assert float(values["val_loss"]) == pytest.approx(last["val_loss"], abs=1e-4)
    assert float(values["reward accuracy"]) == pytest.approx(
        last["val_rewards/accuracies"], abs=1e-4
    )
    assert float(values["margin"]) == pytest.approx(last["val_rewards/margins"], abs=1e-4)
    code, out = _run(["eval", "--model", str(workdir / "model"), "--data", str(pairs[1])], capsys)
    assert code == 2 and "--ref-model: dpo scores pairs against a reference" in out
