"""`sftune export`: a checkpoint becomes the model the run's final/ holds at the same step (full
fine-tune, LoRA adapter, merged LoRA), which transformers loads and sftune generates with; a
path that is not a checkpoint, or an --out that holds something, is one line and no change.
The 2-rank checkpoint is exported in tests/test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftune.cli import main
from sftune.train.loop import train
from trainutil import tiny_config

pytestmark = pytest.mark.slow


def _export(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["export", str(ckpt), "--out", str(out), *extra])


def assert_same_files(a: Path, b: Path, weights: str = "model.safetensors") -> None:
    """The same tensors, bit for bit, under the same names."""
    x, y = load_file(a / weights), load_file(b / weights)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_export_is_final_and_loads(fp64_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = fp64_run
    ckpt = run / "checkpoints" / "step_00000004"
    out = tmp_path / "model"
    assert _export(ckpt, out) == 0
    final = run / "final"
    assert_same_files(out, final)
    for name in ("config.json", "generation_config.json", "sftune.json", "tokenizer.json"):
        assert (out / name).read_text() == (final / name).read_text(), name
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer("Add 1 and 2.", return_tensors="pt")["input_ids"]
    new = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert new.shape == (1, ids.shape[1] + 4)
    capsys.readouterr()
    assert (
        main(["generate", "--model", str(out), "--prompt", "Add 1 and 2.", "--max-new-tokens", "4"])
        == 0
    )
    # --dtype: the same weights, cast.
    assert _export(ckpt, tmp_path / "fp32", "--dtype", "fp32") == 0
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    for k, v in load_file(final / "model.safetensors").items():
        assert fp32[k].dtype == torch.float32 and torch.equal(fp32[k], v.float()), k


def test_export_of_a_lora_checkpoint(workdir, tmp_path):
    pytest.importorskip("peft")
    lora = dict(lora=True, lora_r=4, lr=1e-2, max_steps=2, save_every=2)
    run = train(tiny_config(workdir, tmp_path / "run", **lora)).output_dir
    ckpt = run / "checkpoints" / "step_00000002"
    final = run / "final"
    assert _export(ckpt, tmp_path / "adapter") == 0
    assert_same_files(tmp_path / "adapter", final / "adapter", "adapter_model.safetensors")
    saved = (final / "adapter" / "adapter_config.json").read_text()
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == saved
    assert _export(ckpt, tmp_path / "merged", "--merge") == 0
    assert_same_files(tmp_path / "merged", final)
    assert_same_files(
        tmp_path / "merged" / "adapter", final / "adapter", "adapter_model.safetensors"
    )
    for model in (tmp_path / "adapter", tmp_path / "merged"):  # sftune takes either
        assert (
            main(["generate", "--model", str(model), "--prompt", "Hi", "--max-new-tokens", "2"])
            == 0
        )


def test_bad_export_input_is_one_line_and_touches_nothing(fp64_run, tmp_path, capsys):
    run = fp64_run
    ckpt = run / "checkpoints" / "step_00000004"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (run / "final", tmp_path / "o1", "not a sftune checkpoint directory (no manifest.json)"),
        (tmp_path / "nowhere", tmp_path / "o2", "no such checkpoint directory"),
        (ckpt, taken, "exists and is not empty"),
        (ckpt, afile, "exists and is not empty"),
    ]
    capsys.readouterr()
    for source, out, message in cases:
        assert _export(source, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert _export(ckpt, tmp_path / "o3", "--merge") == 2
    assert "full fine-tune, which has no adapter" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert (taken / "keep.txt").read_text() == "mine" and afile.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
