"""The trained module: a Hugging Face causal LM whose forward returns the token-weighted loss.

Putting the loss inside `forward` keeps the output projection inside the module that FSDP2
shards as the root, so its parameters are gathered when the fused loss reads them, and lets
`torch.compile`, FSDP and autocast treat "model + loss" as one unit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sftune.train.loss import cross_entropy_sum, fused_linear_cross_entropy


def supports_fused_loss(model: nn.Module) -> bool:
    """Fused loss needs logits == hidden @ W.T exactly: no soft-capping or logit scaling."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "final_logit_softcapping", None) or getattr(text_cfg, "logit_scale", None):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and head.bias is None


class CausalLMWithLoss(nn.Module):
    """forward(input_ids, labels, position_ids, scale) -> scale * sum of per-token CE.

    With labels=None, forward returns the logits of the last position (for greedy decoding
    through the same sharded module).
    """

    def __init__(
        self,
        lm: nn.Module,
        *,
        fused: bool,
        autocast_dtype: torch.dtype | None = None,
        chunk_size: int = 4096,
        compiled_loss: bool = False,
    ):
        super().__init__()
        self.lm = lm
        self.fused = fused
        self.compiled_loss = compiled_loss
        self.autocast_dtype = autocast_dtype
        self.chunk_size = chunk_size

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def forward(self, input_ids, labels=None, position_ids=None, scale=1.0):
        with self._autocast(input_ids.device.type):
            if labels is None:
                out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                return out.logits[:, -1, :].float()
            if self.fused:
                return self._fused_loss(input_ids, labels, position_ids, scale)
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            return (
                cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) * scale
            )

    def _fused_loss(self, input_ids, labels, position_ids, scale):
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        weight = self.lm.get_output_embeddings().weight
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        return fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            scale,
            self.chunk_size,
            compiled=self.compiled_loss,
        )


@torch.no_grad()
def greedy_generate(
    module: nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None, sharded: bool
) -> list[int]:
    """Greedy continuation of one prompt.

    Unsharded: Hugging Face `generate` with its KV cache. Sharded (FSDP): every rank runs the
    same full forward per token through the root module, so parameters are gathered in step.
    """
    device = next(module.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if not sharded:
        lm = module.lm
        # Compiled decoder layers would recompile for every KV-cache length: decode eagerly.
        eager = getattr(torch.compiler, "set_stance", None)
        stance = eager("force_eager") if eager else contextlib.nullcontext()
        with stance, module._autocast(device.type):
            out = lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )
        return out[0, len(prompt_ids) :].tolist()
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(module(ids).argmax(-1).item())
        new.append(nxt)
        if nxt == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return new
