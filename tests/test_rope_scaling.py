"""`--rope-scaling TYPE:FACTOR` (issue 26): a context longer than the model's positions, on
purpose. The scaling is set on the model's config before the model is built, so it trains with
it and final/ (and `sftune export`, merged LoRA included) loads with it; without the flag a
`--seq-length` past max_position_embeddings stays a one-line error that names the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from sftune.cli import main
from sftune.config import parse_rope_scaling
from sftune.errors import ConfigError
from sftune.models import apply_rope_scaling
from sftune.presets import check_seq_length
from tiny import byte_tokenizer, tiny_model_dir
from trainutil import train_args

ORIGINAL = 32  # the tiny model's positions; the runs train 64-token windows with yarn:2


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    return tiny_model_dir(
        tmp_path_factory.mktemp("short") / "model", byte_tokenizer(), max_position=ORIGINAL
    )


def config(**kwargs) -> LlamaConfig:
    return LlamaConfig(max_position_embeddings=2048, **kwargs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("linear:2", {"rope_type": "linear", "factor": 2.0}),
        ("yarn:4", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
        (
            "llama3:1.5",
            {
                "rope_type": "llama3",
                "factor": 1.5,
                "original_max_position_embeddings": 2048,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        ),
    ],
)
def test_each_type_gets_the_keys_transformers_reads(value, expected):
    cfg = config()
    apply_rope_scaling(cfg, value)
    assert cfg.rope_parameters == {"rope_theta": cfg.rope_parameters["rope_theta"], **expected}
    assert cfg.max_position_embeddings == int(2048 * expected["factor"])
    cfg.validate_rope()  # transformers' own check of the keys


def test_a_scaled_model_multiplies_its_factor_of_the_same_type_only():
    llama31 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(max_position_embeddings=131072, rope_parameters=dict(llama31))
    apply_rope_scaling(cfg, "llama3:2")
    assert cfg.rope_parameters == {**llama31, "factor": 16.0}
    assert cfg.max_position_embeddings == 262144
    cfg = LlamaConfig(max_position_embeddings=131072, rope_parameters=dict(llama31))
    with pytest.raises(ConfigError, match=r"already llama3-scaled .*--rope-scaling llama3:FACTOR"):
        apply_rope_scaling(cfg, "yarn:2")


def test_a_model_without_rope_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match=r"gpt2 model has no rotary position embeddings"):
        apply_rope_scaling(GPT2Config(), "linear:2")


def test_per_layer_type_rope_scales_the_full_attention_layers():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(max_position_embeddings=1024)
    sliding = dict(cfg.rope_parameters["sliding_attention"])
    apply_rope_scaling(cfg, "linear:8")
    assert cfg.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert cfg.rope_parameters["full_attention"]["factor"] == 8.0
    assert cfg.rope_parameters["sliding_attention"] == sliding
    assert cfg.max_position_embeddings == 8192


@pytest.mark.parametrize(
    "value", ["yarn", "yarn:1", "ntk:2", "yarn:x", "yarn:nan", "linear:-2", ":2"]
)
def test_bad_values_are_one_line_errors_naming_the_flag(value, workdir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--rope-scaling .*TYPE:FACTOR"):
        parse_rope_scaling(value)
    assert main(train_args(workdir, tmp_path / "run", "--rope-scaling", value)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftune: error: --rope-scaling") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_past_the_positions_the_error_names_rope_scaling(short_model, workdir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--rope-scaling yarn:3 \(or linear:, llama3:\)"):
        check_seq_length(80, str(short_model))
    check_seq_length(64, str(short_model), "yarn:2")
    with pytest.raises(ConfigError, match=r"scaled by --rope-scaling yarn:2 \(64\)"):
        check_seq_length(65, str(short_model), "yarn:2")
    extra = ("--model", str(short_model), "--seq-length", "64")
    assert main(train_args(workdir, tmp_path / "run", *extra)) == 2
    assert "--rope-scaling yarn:2" in capsys.readouterr().err


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_final_and_export_load_with_the_scaling(short_model, workdir, tmp_path, lora):
    out = tmp_path / "run"
    extra = ["--model", str(short_model), "--seq-length", "64", "--rope-scaling", "yarn:2"]
    extra += ["--max-steps", "2", "--save-every", "2", *(["--lora"] if lora else [])]
    assert main(train_args(workdir, out, *extra)) == 0
    final = out / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["max_position_embeddings"] == 64
    assert saved["rope_parameters"]["rope_type"] == "yarn"
    assert saved["rope_parameters"]["original_max_position_embeddings"] == ORIGINAL

    ids = torch.arange(3, 67).remainder(200).unsqueeze(0)  # 64 positions, twice the original
    tuned = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    assert tuned.model.rotary_emb.rope_type == "yarn"
    weights = load_file(final / "model.safetensors")

    def base_with(scaling: str | None):
        cfg = AutoConfig.from_pretrained(short_model, local_files_only=True)
        if scaling:
            apply_rope_scaling(cfg, scaling)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.load_state_dict(weights, strict=False)  # a tied head is one tensor
        return model

    # The scaling is what final/ computes with: its logits are the weights' under yarn:2 and
    # not the same weights' at the model's own positions.
    assert torch.equal(logits(tuned, ids), logits(base_with("yarn:2"), ids))
    assert not torch.allclose(logits(tuned, ids)[0, -1], logits(base_with(None), ids)[0, -1])

    ckpt = out / "checkpoints" / "step_00000002"
    export = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(export), *(["--merge"] if lora else [])]) == 0
    assert json.loads((export / "config.json").read_text()) == saved
    exported = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    assert torch.equal(logits(exported, ids), logits(tuned, ids))
