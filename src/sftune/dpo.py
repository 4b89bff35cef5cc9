"""The course's `per_instance_dpo_loss`: the DPO loss of one preference pair, for its adapter.

    >>> from sftune.dpo import per_instance_dpo_loss
    >>> loss = per_instance_dpo_loss(lm, lm_ref, tokenizer, 0.1, prompt, chosen, rejected)  # doctest: +SKIP

Each response is rendered and tokenized exactly as SFT does it (`data.templates.DocumentRenderer`
and `data.tokenize.DocumentEncoder`): the Alpaca template around the prompt, `tokenizer(text)`
(with the BOS where the tokenizer adds one), one EOS appended. The scored tokens are those SFT
trains with `--train-on assistant`: the response's tokens and the EOS, never the prompt's. Each
response's log-prob is the sum over those tokens; the loss is `objectives.dpo` of the four sums,
returned on `lm`'s device (`lm_ref` may sit on another one; it runs without gradients).
"""

from __future__ import annotations

from typing import Any

import torch

from sftune.data.formats import Record
from sftune.data.templates import DocumentRenderer
from sftune.data.tokenize import DocumentEncoder
from sftune.objectives.loss import upcast
from sftune.objectives.preference import PairLogps, dpo


def encode_response(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[bool]]:
    """(token ids with the EOS, whether each token is scored) of one Alpaca-rendered example."""
    doc = DocumentRenderer(tokenizer, "assistant").render(Record(prompt, response))
    encoder = DocumentEncoder(tokenizer, masked=True)
    tokens, _, mask = encoder.encode(
        [doc.text], [doc.spans], [doc.ends_with_eos], [doc.eos_trained]
    )
    return tokens.tolist(), mask.tolist()


def response_logp(lm: torch.nn.Module, ids: list[int], scored: list[bool]) -> torch.Tensor:
    """Sum of log p(token | the tokens before it) over the scored tokens, on `lm`'s device."""
    device = next(lm.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = lm(input_ids=x).logits[0, :-1]  # position t predicts token t + 1
    logps = torch.log_softmax(upcast(logits), dim=-1).gather(1, x[0, 1:, None]).squeeze(1)
    return logps[torch.tensor(scored[1:], device=device)].sum()


def per_instance_dpo_loss(
    lm: torch.nn.Module,
    lm_ref: torch.nn.Module,
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> torch.Tensor:
    """The DPO loss (a scalar on `lm`'s device) of preferring `response_chosen` over
    `response_rejected` for `prompt`, with `lm_ref` as the reference (module docstring)."""
    chosen = encode_response(tokenizer, prompt, response_chosen)
    rejected = encode_response(tokenizer, prompt, response_rejected)
    device = next(lm.parameters()).device
    policy = [response_logp(lm, *seq) for seq in (chosen, rejected)]
    with torch.no_grad():
        ref = [response_logp(lm_ref, *seq).to(device) for seq in (chosen, rejected)]
    counts = [torch.tensor([float(sum(s[1:]))], device=device) for _, s in (chosen, rejected)]
    pairs = [PairLogps(c.reshape(1), r.reshape(1), *counts) for c, r in (policy, ref)]
    return dpo(pairs[0], pairs[1], beta).losses[0]
