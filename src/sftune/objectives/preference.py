"""The preference objectives: DPO, IPO, SimPO and ORPO over per-pair log-probs, as TRL defines them.

Everything here is a pure function of the summed response log-probs of each pair (the policy's,
and the reference's for DPO/IPO) and the response token counts (`PairLogps`); the model, the
packing and the reference pass live elsewhere. With l_c, l_r the summed log-probs of the chosen
and rejected response, n_c, n_r their token counts, and ref_* the reference's:

* `dpo`   (TRL `DPOTrainer`, loss_type "sigmoid"): h = (l_c - l_r) - (ref_c - ref_r),
  loss = -log sigmoid(beta h); rewards beta (l - ref).
* `ipo`   (TRL loss_type "ipo"): the same h from log-probs *averaged per token* (l / n, for the
  policy and the reference alike), loss = (h - 1 / (2 beta))^2; rewards and `logps/*` averaged.
* `simpo` (TRL `CPOTrainer`, loss_type "simpo"): reference-free, averaged log-probs a = l / n,
  loss = -log sigmoid(beta (a_c - a_r) - gamma) (TRL writes beta (a_c - a_r - gamma / beta));
  rewards beta a.
* `orpo`  (TRL `ORPOTrainer`, its `beta` is the paper's lambda): averaged a, log odds
  o = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)), preference loss -beta log sigmoid(o),
  plus the chosen response's NLL (weight 1); rewards beta a.

`nll_weight` A (RPO, TRL's `rpo_alpha`) adds A times the chosen responses' token-weighted NLL to
dpo/ipo/simpo: sum of -l_c over the step's pairs / the step's chosen tokens (TRL: the mean
cross-entropy over the chosen tokens of a batch). ORPO always carries it with A = 1.

The loss of an optimizer step is the mean of the per-pair losses over every pair of the step
(all micro-batches, all ranks), plus the NLL term over every chosen token of the step. As in
objectives/loss.py, each micro-batch returns its *share*, its sums divided by the step's global
counts (`loss_share`), so accumulation and world size cannot change the gradient.

Metrics carry TRL's names (`METRICS`); `metric_sums` gives per-micro-batch sums to add up over
the step (and all-reduce), `metric_means` divides by the step's pair count. At policy ==
reference DPO gives loss ln 2, margins 0 and accuracy 0 (a tie is not a win, as in TRL).

    >>> out = pair_loss("dpo", policy, ref, beta=0.1)  # doctest: +SKIP
    >>> loss_share(out, policy, step_pairs, step_chosen_tokens).backward()  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sftune.objectives.loss import upcast

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PairLogps(NamedTuple):
    """Per pair (P,): summed response log-probs and response token counts (EOS included)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs (chosen, rejected), as IPO, SimPO and ORPO use them."""
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


class PairLoss(NamedTuple):
    """Per pair (P,): the preference loss, the rewards and the log-probs TRL logs (detached),
    and the weight of the chosen token-weighted NLL that `loss_share` adds."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_weight: float = 0.0


def _result(losses, chosen, rejected, ref_c, ref_r, beta, nll_weight) -> PairLoss:
    """Rewards beta * (policy - reference), from whichever log-probs the loss used."""
    return PairLoss(
        losses,
        (beta * (chosen - ref_c)).detach(),
        (beta * (rejected - ref_r)).detach(),
        chosen.detach(),
        rejected.detach(),
        nll_weight,
    )


def dpo(policy: PairLogps, ref: PairLogps, beta: float, nll_weight: float = 0.0) -> PairLoss:
    """DPO's sigmoid loss on summed log-probs (see the module docstring)."""
    c, r, rc, rr = (upcast(t) for t in (policy.chosen, policy.rejected, ref.chosen, ref.rejected))
    h = (c - r) - (rc - rr)
    return _result(-F.logsigmoid(beta * h), c, r, rc, rr, beta, nll_weight)


def ipo(policy: PairLogps, ref: PairLogps, beta: float, nll_weight: float = 0.0) -> PairLoss:
    """IPO's squared loss on per-token averaged log-probs (see the module docstring)."""
    c, r = (upcast(t) for t in policy.averaged())
    rc, rr = (upcast(t) for t in ref.averaged())
    h = (c - r) - (rc - rr)
    return _result((h - 1 / (2 * beta)) ** 2, c, r, rc, rr, beta, nll_weight)


def simpo(policy: PairLogps, beta: float, gamma: float, nll_weight: float = 0.0) -> PairLoss:
    """SimPO: reference-free, length-normalized, target margin `gamma` (module docstring)."""
    c, r = (upcast(t) for t in policy.averaged())
    losses = -F.logsigmoid(beta * (c - r) - gamma)
    return _result(losses, c, r, 0.0, 0.0, beta, nll_weight)


def orpo(policy: PairLogps, beta: float) -> PairLoss:
    """ORPO's odds-ratio term; `loss_share` adds the chosen NLL (weight 1)."""
    c, r = (upcast(t) for t in policy.averaged())
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return _result(-beta * F.logsigmoid(log_odds), c, r, 0.0, 0.0, beta, 1.0)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0: TRL's log1p(-exp(a)), but through expm1 near 0 (a likely
    response), where 1 - e^a rounds away; the same value elsewhere (Maechler's split at -ln 2)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def pair_loss(
    objective: str,
    policy: PairLogps,
    ref: PairLogps | None = None,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    nll_weight: float = 0.0,
) -> PairLoss:
    """The `objective`'s per-pair loss; `ref` is needed unless it is in `REFERENCE_FREE`."""
    if objective == "orpo":
        return orpo(policy, beta)
    if objective == "simpo":
        return simpo(policy, beta, gamma, nll_weight)
    if ref is None:
        raise ValueError(f"{objective} needs the reference log-probs")
    if objective == "dpo":
        return dpo(policy, ref, beta, nll_weight)
    if objective == "ipo":
        return ipo(policy, ref, beta, nll_weight)
    raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


def loss_share(
    out: PairLoss,
    policy: PairLogps,
    step_pairs: torch.Tensor | float,
    step_chosen_tokens: torch.Tensor | float,
) -> torch.Tensor:
    """This micro-batch's part of the step loss: its per-pair losses summed / the step's pair
    count, plus nll_weight * its chosen NLL summed / the step's chosen-token count (both counts
    over all micro-batches and ranks). The shares of a step add up to the step's loss."""
    share = out.losses.sum() / step_pairs
    if out.nll_weight:
        share = share + out.nll_weight * -upcast(policy.chosen).sum() / step_chosen_tokens
    return share


def metric_sums(out: PairLoss) -> dict[str, torch.Tensor]:
    """Each of `METRICS` summed over this micro-batch's pairs (add over the step, all-reduce)."""
    return {
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).to(out.losses).sum(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
        "logps/chosen": out.chosen_logps.sum(),
        "logps/rejected": out.rejected_logps.sum(),
    }


def metric_means(sums: dict[str, torch.Tensor], pairs: torch.Tensor | float) -> dict[str, float]:
    """The step's metrics: the sums of `metric_sums` over the step divided by its pair count."""
    return {name: float(value / pairs) for name, value in sums.items()}


def pair_logps(
    token_logps: torch.Tensor,
    pair_index: torch.Tensor,
    is_chosen: torch.Tensor,
    num_pairs: int,
) -> PairLogps:
    """Sum per-token log-probs into `PairLogps`. token_logps (N,) (e.g. from
    `loss.fused_linear_token_logprobs`); pair_index (N,) the pair a scored token belongs to,
    -1 for unscored tokens (prompts, padding); is_chosen (N,) whether it is in the chosen
    response. Pairs are numbered 0..num_pairs-1 within the micro-batch."""
    scored = pair_index >= 0
    values = upcast(token_logps) * scored
    index = pair_index.clamp(min=0)
    sums, counts = [], []
    for side in (is_chosen, ~is_chosen):
        keep = (scored & side).to(values.dtype)
        zeros = torch.zeros(num_pairs, dtype=values.dtype, device=values.device)
        sums.append(zeros.index_add(0, index, values * keep))
        counts.append(zeros.index_add(0, index, keep))
    return PairLogps(sums[0], sums[1], counts[0], counts[1])


# ----------------------------------------------------------------------------- the seam
#
# What the trainer's step and evaluation loop call, whatever the objective (train/step.py,
# train/evaluate.py, train/loop.py never ask which one runs). A micro-batch is the dict of
# tensors its dataset's `get_batch` returns. Per micro-batch:
#
#     counts = objective.counts(batch)            # (K,) float64: what the step normalises by
#     share, sums = objective.loss(module, batch, step_counts, world_size)   # backward(share)
#     objective.train_row(step_sums, step_counts) # the metrics of a step (all ranks summed)
#     objective.eval_sums(module, batch)          # (E,) float64, summed over a validation pass
#     objective.eval_row(totals)                  # {"val_loss": ..., ...}, and its count


class TokenCrossEntropy:
    """SFT: the token-weighted cross-entropy of the labels (objectives/loss.py); a step's count is
    its trained tokens."""

    name = "sft"
    needs_reference = False
    EVAL = ("loss", "tokens")  # what eval_sums returns

    def counts(self, batch) -> torch.Tensor:
        from sftune.data import IGNORE_INDEX

        return (batch["labels"] != IGNORE_INDEX).sum().reshape(1).double()

    def counters(self, counts: list[float]) -> tuple[int, int]:
        """(trained tokens, pairs) of a step, from its counts."""
        return int(counts[0]), 0

    def loss(self, module, batch, step_counts, world_size: int):
        # DDP and FSDP average each gradient over the ranks, hence the world size.
        scale = world_size / step_counts[0].clamp(min=1.0)
        loss = module(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            position_ids=batch.get("position_ids"),
            scale=scale.float(),
        )
        return loss, loss.new_zeros(0)

    def train_row(self, sums: list[float], counts: list[float]) -> dict[str, float]:
        """The step's metrics from its (all-reduced) metric sums and counts: none for SFT."""
        return {}

    def eval_sums(self, module, batch) -> torch.Tensor:
        loss = module(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            position_ids=batch.get("position_ids"),
        )
        return torch.stack([loss.double(), self.counts(batch)[0]])

    def eval_row(self, totals: torch.Tensor) -> tuple[dict[str, float], int]:
        return {"val_loss": float(totals[0] / totals[1].clamp(min=1.0))}, int(totals[1])


class PairPreference:
    """DPO, IPO, SimPO, ORPO on packed pairs (data/pairs.py): a step's counts are its pairs and
    its chosen response tokens; the loss of a step is the mean over its pairs (all micro-batches,
    all ranks) plus the NLL term over its chosen tokens (`loss_share`).

    `mask` builds the pair attention mask (`prompt | chosen | rejected`, the rejected tokens
    never seeing the chosen ones) in the form the model's attention implementation takes."""

    EVAL = ("loss", "pairs", "accuracies", "margins", "nll", "chosen_tokens")

    def __init__(
        self, name: str, attn: str, *, beta: float, gamma: float = 0.5, nll_weight: float = 0.0
    ):
        if attn == "flash_attention_2":
            raise ValueError(
                "--attn flash_attention_2 cannot hold the pair mask (the rejected response "
                "skips the chosen one): use sdpa or flex_attention"
            )
        self.name, self.attn = name, attn
        self.beta, self.gamma, self.nll_weight = beta, gamma, nll_weight
        self.needs_reference = name not in REFERENCE_FREE

    def mask(self, segment: torch.Tensor, dtype: torch.dtype):
        from sftune.data.pairs import attention_mask_4d, flex_block_mask

        if self.attn == "flex_attention":
            return flex_block_mask(segment)
        # sdpa takes the bool form (True: attend); eager adds the mask to its scores.
        return attention_mask_4d(segment, dtype if self.attn == "eager" else None)

    def counts(self, batch) -> torch.Tensor:
        side = batch["side"]
        counts = [batch["pair_ids"].numel(), (side == 0).sum(), side.numel()]
        return torch.stack([torch.as_tensor(c, device=side.device) for c in counts]).double()

    def counters(self, counts: list[float]) -> tuple[int, int]:
        """(trained tokens: the scored response tokens, pairs) of a step, from its counts."""
        return int(counts[2]), int(counts[0])

    def policy_logps(self, module, batch) -> PairLogps:
        """The module's summed response log-probs of each pair of the batch (and the counts)."""
        dtype = next(module.parameters()).dtype
        token_logps = module(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=self.mask(batch["segment"], dtype),
            source=batch["source"],
            target=batch["target"],
        )
        return _pair_logps(token_logps, batch["pair"], batch["side"], batch["pair_ids"].numel())

    def _pair_loss(self, module, batch) -> tuple[PairLoss, PairLogps]:
        policy = self.policy_logps(module, batch)
        ref = None
        if self.needs_reference:
            ref_logps = batch["ref_logps"].to(policy.chosen.dtype)
            ref = PairLogps(ref_logps[:, 0], ref_logps[:, 1], *policy[2:])
        out = pair_loss(
            self.name, policy, ref, beta=self.beta, gamma=self.gamma, nll_weight=self.nll_weight
        )
        return out, policy

    def loss(self, module, batch, step_counts, world_size: int):
        out, policy = self._pair_loss(module, batch)
        # DDP and FSDP average each gradient over the ranks, hence the world size.
        share = loss_share(out, policy, step_counts[0], step_counts[1].clamp(min=1.0))
        sums = torch.stack([v.double() for v in metric_sums(out).values()])
        return share * world_size, sums

    def train_row(self, sums: list[float], counts: list[float]) -> dict[str, float]:
        """TRL's `rewards/*` and `logps/*` of a step: its sums over its pairs."""
        pairs = max(counts[0], 1.0)
        return {name: v / pairs for name, v in zip(METRICS, sums, strict=True)}

    def eval_sums(self, module, batch) -> torch.Tensor:
        out, policy = self._pair_loss(module, batch)
        m = metric_sums(out)
        counts = self.counts(batch)
        return torch.stack(
            [
                out.losses.sum().double(),
                counts[0],
                m["rewards/accuracies"].double(),
                m["rewards/margins"].double(),
                -upcast(policy.chosen).sum().double(),
                counts[1],
            ]
        )

    def eval_row(self, totals: torch.Tensor) -> tuple[dict[str, float], int]:
        t = dict(zip(self.EVAL, totals.tolist(), strict=True))
        pairs = max(t["pairs"], 1.0)
        loss = t["loss"] / pairs
        weight = 1.0 if self.name == "orpo" else self.nll_weight
        if weight:
            loss += weight * t["nll"] / max(t["chosen_tokens"], 1.0)
        row = {
            "val_loss": loss,
            "val_rewards/accuracies": t["accuracies"] / pairs,
            "val_rewards/margins": t["margins"] / pairs,
        }
        return row, int(t["pairs"])


def _pair_logps(token_logps, pair, side, num_pairs: int) -> PairLogps:
    """Per-token log-probs summed per pair and side, and the token counts (data/pairs.py)."""
    from sftune.data.pairs import sum_by_pair

    sums = sum_by_pair(upcast(token_logps), pair, side, num_pairs)
    ones = torch.ones(token_logps.shape, dtype=sums.dtype, device=sums.device)
    counts = sum_by_pair(ones, pair, side, num_pairs)
    return PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])


def build_objective(cfg, attn: str):
    """--objective as the object the trainer's step calls (see "the seam" above)."""
    if cfg.loss.objective == "sft":
        return TokenCrossEntropy()
    return PairPreference(
        cfg.loss.objective,
        attn,
        beta=cfg.loss.beta,
        gamma=cfg.loss.simpo_gamma,
        nll_weight=cfg.loss.nll_weight,
    )
