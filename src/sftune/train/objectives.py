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
train/loss.py, each micro-batch returns its *share*, its sums divided by the step's global
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

from sftune.train.loss import upcast

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
