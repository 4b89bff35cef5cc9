"""FP8 training with torchao: the decoder's matrix products in FP8 on Hopper and Ada GPUs.

    sftune train --model DIR --train-data train.jsonl --fp8 tensorwise   # the faster recipe
    sftune train --model DIR --train-data train.jsonl --fp8 rowwise      # robust to outliers

A model transform applied at build time, before per-layer compile and FSDP2 (torchtitan's
order): `convert` swaps every `nn.Linear` of the decoder blocks for torchao's `Float8Linear`
(`torchao.float8.convert_to_float8_training`). Each of its three GEMMs (forward, input
gradient, weight gradient) casts both operands to FP8 with a scale computed from their current
absolute maximum, runs on the FP8 tensor cores (twice the bf16 rate on H100/H200) and returns
the result in the weights' dtype. Everything else is unchanged: the weights, their gradients
and AdamW's moments stay in bf16 (or fp32), so checkpoints and the final `save_pretrained`
model are ordinary weights, loadable without torchao.

Kept in bf16: the output projection (the fused loss reads its weight directly, and logits are
where FP8's 3-bit mantissa would cost most), any linear whose input or output size is not a
multiple of 16 (FP8 GEMMs need that). `--fp8-linears auto` also keeps the linears that torchao's
size thresholds (`_auto_filter_for_recipe`, from its H100 tables) deem too small for FP8 to pay
for its casts: for tensorwise, K <= 4096 with N <= 1024, which are the Llama 3 8B's k/v
projections; rowwise also keeps N <= 2048, K <= 1024, and N <= 4096 with K <= 2048. On the 8B
(H200, 32 x 512 tokens) that gained nothing (17,975 against 18,021 tokens/s for all) and cost
6 GiB (their bf16 inputs are saved for backward instead of FP8 ones), so `all` is the default.

The recipes (torchao's names):
    tensorwise  one scale per tensor: the fastest; an outlier in a tensor coarsens every value's
                precision. Under FSDP2 the weights are all-gathered in FP8 (half the bytes), and
                all their scales come from one all-reduce after each optimizer step.
    rowwise     one scale per row (power-of-2 scales): slower GEMMs, but an outlier only costs
                its own row; torchao's recommendation for accuracy. Weights are all-gathered in
                bf16 (torchao has no FP8 all-gather for it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import torch
from torch import nn

from sftune.errors import ConfigError
from sftune.train.distributed import decoder_layers

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89: L4, L40S, RTX 40xx) and Hopper (sm90)
INSTALL = "pip install 'sftune[fp8]'"


def enabled(recipe: str) -> bool:
    return recipe != "off"


def check_available(recipe: str, device: torch.device) -> None:
    """One-line errors, before the model loads: no torchao, no GPU, or a GPU without FP8."""
    if not enabled(recipe):
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"--fp8 needs torchao: {INSTALL}")
    if device.type != "cuda":
        raise ConfigError(
            f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer: "
            f"H100, H200, L4, L40S, RTX 40xx); this run is on the {device.type}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"--fp8 needs FP8 tensor cores (compute capability 8.9 or newer: H100, H200, L4, "
            f"L40S, RTX 40xx); {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}: train in bf16 (--fp8 off)"
        )


def fp8_eligible(module: nn.Module) -> bool:
    """A linear layer that FP8 GEMMs can serve: both sizes multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def large_enough(module: nn.Module, recipe: str) -> bool:
    """torchao's size heuristic: whether FP8 GEMMs beat bf16 on this linear, casts included."""
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=[])(module, "")


def convert(
    hf_model: nn.Module,
    recipe: str,
    *,
    all_gather: bool,
    linears: str = "all",
    emulate: bool = False,
) -> str:
    """Swap the decoder blocks' linears for torchao's Float8Linear, in place: those FP8 can
    serve and, with `linears="auto"`, large enough to gain; returns a note saying what was
    converted and what kept bf16.

    all_gather: under FSDP2, all-gather the weights in FP8 (tensorwise only; call before
    fully_shard). emulate: torchao's reference math instead of FP8 GEMMs, for tests on a CPU.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe),
        enable_fsdp_float8_all_gather=all_gather and recipe == "tensorwise",
        emulate=emulate,
    )
    found = [m for layer in decoder_layers(hf_model) for m in layer.modules()]
    found = [m for m in found if isinstance(m, nn.Linear)]
    unfit = {id(m) for m in found if not fp8_eligible(m)}
    small = {
        id(m)
        for m in found
        if linears == "auto" and id(m) not in unfit and not large_enough(m, recipe)
    }
    kept_ids = unfit | small
    chosen = lambda m, _fqn: isinstance(m, nn.Linear) and id(m) not in kept_ids  # noqa: E731
    for layer in decoder_layers(hf_model):
        convert_to_float8_training(layer, config=config, module_filter_fn=chosen)
    if recipe == "rowwise":
        # Compiled recomputation (the activation memory budget) must round as eager did, or
        # the recomputed FP8 casts differ from the forward's (torchtitan sets the same for
        # rowwise; pytorch/pytorch#150859).
        torch._inductor.config.emulate_precision_casts = True
    gather = " (FP8 all-gather)" if config.enable_fsdp_float8_all_gather else ""
    kept = ["the output projection"]
    if small:
        kept.append(f"{len(small)} too small to gain (--fp8-linears all converts them)")
    if unfit:
        kept.append(f"{len(unfit)} not sized in multiples of 16")
    converted = len(found) - len(small) - len(unfit)
    return (
        f"FP8 ({recipe}, torchao): {converted} decoder linears{gather}; kept in bf16: "
        + ", ".join(kept)
    )


def precompute_scales_after_steps(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """With FP8 all-gather: the FP8 scales of all weights from one all-reduce, after every
    optimizer step (torchtitan's post-optimizer hook) and after a checkpoint is loaded into
    `module`; otherwise each weight's all-gather would reduce its own scale."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    def precompute(*_args) -> None:
        precompute_float8_dynamic_scale_for_fsdp(module)

    optimizer.register_step_post_hook(precompute)
    # A scale precomputed before a resume (the micro-batch probe steps the optimizer) would
    # be stale for the loaded weights.
    module.register_load_state_dict_post_hook(precompute)


def plain_state_dict(state: dict) -> dict:
    """The state dict with torchao's FP8 all-gather weight wrappers replaced by the bf16/fp32
    tensors they hold (sharing their memory), so that checkpoints hold ordinary tensors that
    load without torchao. Anything else is returned as it is."""
    if "torchao.float8" not in sys.modules:  # nothing can hold a wrapper
        return state
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    def plain(value):
        if not isinstance(value, DTensor):
            return value
        local = value.to_local()
        if not isinstance(local, WeightWithDynamicFloat8CastTensor):
            return value
        return DTensor.from_local(
            local._tensor,  # torchao's name for the wrapped tensor
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )

    return {k: plain(v) for k, v in state.items()}
