"""LoRA on the tiny model (CPU, fp64): adapters-only checkpoints that resume exactly, PEFT's
adapter format and a merged model that both load, and one-line errors for what cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError, SftuneError
from sftune.train.loop import train
from trainutil import losses, tiny_config, weights

pytest.importorskip("peft")


def _cfg(workdir: Path, out: Path, **over) -> config_mod.RunConfig:
    """LoRA r 4 with checkpoints every 2 steps (and micro-batches of 4) on the tiny model."""
    lora = dict(lora=True, lora_r=4, lr=1e-2, micro_batch_size=4, save_every=2)
    return tiny_config(workdir, out, **{**lora, **over})


def test_lora_trains_saves_adapters_only_and_resumes_exactly(workdir, tmp_path):
    full = train(_cfg(workdir, tmp_path / "full"))
    assert full.val_loss_end < full.val_loss_start
    # A checkpoint holds the adapters and their AdamW moments, not the frozen base.
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000002"
    keys = FileSystemReader(str(ckpt / "model_optim")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)
    assert not any("embed_tokens" in k or "base_layer" in k for k in keys)
    # Resumed from step 2 in another directory: the same steps 3-4 and bit-identical weights.
    again = train(_cfg(workdir, tmp_path / "again", resume=str(ckpt)))
    assert again.steps == 4
    la, lb = losses(tmp_path / "full"), losses(tmp_path / "again")
    assert all(la[s] == lb[s] for s in (3, 4))
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "again")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adapter_and_merged_model_load_and_agree(workdir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(_cfg(workdir, tmp_path / "run", max_steps=2, save_every=0))
    final = tmp_path / "run" / "final"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float64)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float64)
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, final / "adapter")
    with torch.no_grad():
        a, m = adapted(ids).logits, merged(ids).logits
    assert not torch.allclose(a, before)  # the adapters changed the model
    torch.testing.assert_close(a, m, rtol=1e-9, atol=1e-9)
    # sftune eval and generate take the adapter directory as well as the merged model.
    for model in (final, final / "adapter"):
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(model),
                    "--data",
                    str(workdir / "train.jsonl"),
                    "--seq-length",
                    "32",
                    "--max-sequences",
                    "16",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "generate",
                "--model",
                str(final / "adapter"),
                "--prompt",
                "Add 1 and 2.",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )


def test_lora_and_full_checkpoints_do_not_mix(workdir, tmp_path, capsys):
    train(_cfg(workdir, tmp_path / "lora", max_steps=2))
    train(_cfg(workdir, tmp_path / "full", max_steps=2, lora=False))
    ckpt = "checkpoints/step_00000002"
    with pytest.raises(SftuneError, match="from a LoRA run .*this run is a full fine-tune"):
        train(_cfg(workdir, tmp_path / "x", lora=False, resume=str(tmp_path / "lora" / ckpt)))
    with pytest.raises(SftuneError, match="from a full fine-tune.*this run is a LoRA run"):
        train(_cfg(workdir, tmp_path / "y", resume=str(tmp_path / "full" / ckpt)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_lora_settings_are_one_line_errors(workdir, tmp_path):
    with pytest.raises(ConfigError, match="--lora-targets 'nope'"):
        train(_cfg(workdir, tmp_path / "a", lora_targets="nope"))
    with pytest.raises(ConfigError, match="--qlora needs a CUDA GPU"):
        train(_cfg(workdir, tmp_path / "b", lora=False, qlora=True, device="cpu"))
    with pytest.raises(ConfigError, match="--lora-r must be >= 1"):
        _cfg(workdir, tmp_path / "c", lora_r=0)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_final_of_a_tied_model_is_the_merged_export(workdir, tmp_path):
    """final/ stores a tied head once, as `sftune export --merge` and save_pretrained do (the
    SmolLM2 preset's final/ held lm_head.weight beside the embeddings: 651 MB for 538)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tiny import byte_tokenizer, tiny_model_dir

    model = tiny_model_dir(tmp_path / "tied", byte_tokenizer(), tie=True)
    run = train(_cfg(workdir, tmp_path / "run", model=str(model), max_steps=2)).output_dir
    out = tmp_path / "export"
    assert (
        main(["export", str(run / "checkpoints" / "step_00000002"), "--out", str(out), "--merge"])
        == 0
    )
    final, exported = (load_file(d / "model.safetensors") for d in (run / "final", out))
    assert "lm_head.weight" not in final and final.keys() == exported.keys()
    assert all(torch.equal(final[k], exported[k]) for k in final)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    a, b = (
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64) for d in (run / "final", out)
    )
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied again on load
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
