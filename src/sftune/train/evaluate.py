"""The one evaluation loop: token-weighted loss of a model over a packed dataset.

Used by the trainer (validation passes) and by `sftune eval`:

    loss, tokens = evaluate(module, dataset, micro_batch_size=8, device=device, max_sequences=64)
    sftune eval --model runs/x/final --data test.jsonl --max-sequences 64

A pass covers the first `max_sequences` sequences of the dataset, whatever the micro-batch
size and the number of ranks (rank r takes sequences r, r + W, ...), and its loss is the
summed cross-entropy over them divided by their trained tokens, summed in float64: so the
same model gets the same validation loss under any layout (to the rounding of the forward
itself; exactly equal in fp64 runs to 1e-15). Under FSDP every rank runs the same number of
forwards (they gather parameters together); a rank with fewer items runs padding forwards
whose loss is weighted 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from sftune.errors import DataError, SftuneError
from sftune.objectives.preference import TokenCrossEntropy
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.step import load_batch


class EvalInterrupted(Exception):
    """SIGINT / SIGTERM arrived during an evaluation, which stopped within one micro-batch."""


def eval_items(num_items: int, max_sequences: int) -> int:
    """How many items a pass covers: all (max_sequences 0), or the first `max_sequences`."""
    return num_items if max_sequences <= 0 else min(num_items, max_sequences)


def rank_chunks(num_items: int, micro_batch_size: int, world: World, device) -> Iterator[list]:
    """This rank's items of a forward-only pass over the first `num_items` (rank r takes r,
    r + W, ...), a micro-batch at a time. Every rank yields the same number of chunks (under
    FSDP the ranks gather parameters together): a rank with fewer items gets empty ones, for
    which the caller runs a padding forward and weights it 0."""
    mine = list(range(world.rank, num_items, world.world_size))
    forwards = torch.tensor([math.ceil(len(mine) / micro_batch_size)], device=device)
    forwards = int(distributed.all_reduce_max(forwards).item())
    for i in range(forwards):
        yield mine[i * micro_batch_size : (i + 1) * micro_batch_size]


@torch.no_grad()
def evaluate_pass(
    module: torch.nn.Module,
    dataset,
    *,
    objective,
    micro_batch_size: int,
    device: torch.device,
    world: World = World(),
    max_sequences: int = 0,
    varlen: bool = False,
    on_batch: Callable[[], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], int]:
    """The validation row of `objective` (objectives/preference.py: {"val_loss": ...} and, for pairs,
    the rewards' accuracy and margin) and its count (trained tokens, or pairs) over the first
    `eval_items(...)` items of `dataset`, all ranks together. `on_batch` is called after each
    micro-batch (a progress bar); `stop_requested` is asked before each one and raises
    EvalInterrupted when it says so (under torchrun it must agree across ranks)."""
    was_training = module.training
    module.eval()
    n = eval_items(len(dataset), max_sequences)
    # The objective's sums (float64): loss, count, ...
    totals = torch.zeros(len(objective.EVAL), dtype=torch.float64, device=device)
    for chunk in rank_chunks(n, micro_batch_size, world, device):
        if stop_requested is not None and stop_requested():
            raise EvalInterrupted
        b = load_batch(dataset, chunk or [0], device, varlen)
        totals += objective.eval_sums(module, b) * (1.0 if chunk else 0.0)
        if on_batch is not None:
            on_batch()
    totals = distributed.all_reduce_sum(totals)
    module.train(was_training)
    return objective.eval_row(totals)


def evaluate(module: torch.nn.Module, dataset, **kw) -> tuple[float, int]:
    """(token-weighted mean loss, trained tokens): `evaluate_pass` of SFT's cross-entropy."""
    row, tokens = evaluate_pass(module, dataset, objective=TokenCrossEntropy(), **kw)
    return row["val_loss"], tokens


def evaluate_file(
    model: str,
    data: str,
    *,
    seq_length: int,
    batch_size: int,
    fields: dict[str, str] | None = None,
    train_on: str = "auto",
    response_only: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    max_sequences: int = 0,
) -> tuple[float, int]:
    """`sftune eval --data`: (loss, trained tokens) of a saved model or preset on a data file
    (its first `max_sequences` packed sequences; 0: all). No trained token is an error."""
    from sftune.data import PackedSFTDataset
    from sftune.models import quiet_libraries
    from sftune.train.module import CausalLMWithLoss
    from sftune.transforms.lora import load_for_inference

    quiet_libraries(verbose=False)
    dev = distributed.resolve_device(device, World())
    lm, tokenizer, _ = load_for_inference(model, device=dev, dtype=dtype)
    dataset = PackedSFTDataset(
        tokenizer,
        data,
        seq_length,
        False,
        fields=fields,
        train_on=train_on,
        response_only=response_only,
    )
    module = CausalLMWithLoss(lm, fused=False)
    loss, tokens = evaluate(
        module, dataset, micro_batch_size=batch_size, device=dev, max_sequences=max_sequences
    )
    if tokens == 0:  # a loss over nothing would print as perplexity 1.000
        raise DataError(
            data,
            f"no scored tokens in {eval_items(len(dataset), max_sequences)} sequence(s) of "
            f"{seq_length} tokens (--train-on {dataset.train_on}): nothing to evaluate",
        )
    return loss, tokens


def evaluate_pairs_file(
    model: str,
    data: str,
    *,
    objective: str,
    ref_model: str | None,
    beta: float,
    simpo_gamma: float = 0.5,
    nll_weight: float = 0.0,
    seq_length: int,
    batch_size: int,
    fields: dict[str, str] | None = None,
    truncation: str = "refuse",
    dtype: str = "auto",
    device: str = "auto",
    max_sequences: int = 0,
) -> tuple[dict[str, float], int]:
    """`sftune eval --data pairs.jsonl`: the validation row of a preference objective (val_loss,
    val_rewards/accuracies, val_rewards/margins) of a saved model on a file of pairs, scored
    against `ref_model` as training scores its held-out pairs, and the number of pairs."""
    from sftune.data.pair_dataset import PackedPairDataset
    from sftune.models import quiet_libraries
    from sftune.objectives.preference import PairPreference
    from sftune.objectives.reference import check_same_tokenizer, reference_logps
    from sftune.train.module import CausalLMWithLoss
    from sftune.transforms.lora import load_for_inference

    quiet_libraries(verbose=False)
    dev = distributed.resolve_device(device, World())
    lm, tokenizer, info = load_for_inference(model, device=dev, dtype=dtype)
    dataset = PackedPairDataset(
        tokenizer, data, seq_length, False, fields=fields, truncation=truncation, verbose=False
    )
    try:
        scorer = PairPreference(
            objective, info.attn_implementation, beta=beta, gamma=simpo_gamma, nll_weight=nll_weight
        )
    except ValueError as e:
        raise SftuneError(f"{model}: {e}") from None
    pass_args = dict(micro_batch_size=batch_size, device=dev)
    if scorer.needs_reference:
        if not ref_model:
            raise SftuneError(
                f"--ref-model: {objective} scores pairs against a reference, and {model} records "
                "none (sftune.json): name the model it was tuned from"
            )
        ref, ref_tokenizer, _ = load_for_inference(ref_model, device=dev, dtype=dtype)
        check_same_tokenizer(ref_tokenizer, tokenizer, ref_model, model)
        logps = reference_logps(CausalLMWithLoss(ref, fused=False), dataset, scorer, **pass_args)
        dataset.set_reference(logps)
        del ref
    module = CausalLMWithLoss(lm, fused=False)
    return evaluate_pass(
        module, dataset, objective=scorer, max_sequences=max_sequences, **pass_args
    )
