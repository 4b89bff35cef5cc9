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
    """A causal LM whose forward returns `scale * (sum of per-token CE over trained labels)`.

        loss = module(input_ids=ids, labels=labels, position_ids=None, scale=1 / n_tokens)
        logits = module.last_logits(input_ids=ids)    # (B, V) fp32, for decoding step by step

    `last_logits` is registered with FSDP2 as a forward method (distributed.apply_fsdp), so
    the root's parameters are gathered for it just as for forward.
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

    def autocast(self, device_type: str):
        """bf16 autocast for `--dtype bf16-mixed`; nothing otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def forward(self, input_ids, labels, position_ids=None, scale=1.0):
        with self.autocast(input_ids.device.type):
            if self.fused:
                return self._fused_loss(input_ids, labels, position_ids, scale)
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            return (
                cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) * scale
            )

    def last_logits(self, input_ids, position_ids=None):
        """The logits of the last position, (B, vocab) in fp32."""
        with self.autocast(input_ids.device.type):
            out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.logits[:, -1, :].float()

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
