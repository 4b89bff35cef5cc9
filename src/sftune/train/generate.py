"""Text generation from a (training or saved) model: greedy or sampled, stopping where the
answer ends.

    ids = prompt_ids(tokenizer, "What is 12 * 7?", "alpaca")
    text = generate(module, tokenizer, ids, max_new_tokens=128, temperature=0.7, top_p=0.9)
    sftune generate --model runs/x/final --prompt "What is 12 * 7?" --temperature 0.7

Generation stops at the EOS token, at a chat template's end-of-turn token, and at the Alpaca
template's next "### Instruction:" (a model that has not learnt to stop would otherwise run on
into a new task until the token limit).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from sftune.data.templates import render_alpaca

PROMPT_FORMATS = ("auto", "alpaca", "chat")
FORMAT_FILE = "sftune.json"  # written into final/: the prompt format the model was tuned with
STOP_STRINGS = ("### Instruction:",)
# End-of-turn tokens of common chat templates (Llama 3, ChatML, Gemma), used when present.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def prompt_format(model_dir: str | Path | None, tokenizer, requested: str = "auto") -> str:
    """ "alpaca" or "chat". auto: what sftune tuned the model with (final/sftune.json), else the
    chat template when the tokenizer has one, else Alpaca."""
    if requested != "auto":
        return requested
    meta = Path(model_dir) / FORMAT_FILE if model_dir else None
    if meta is not None and meta.is_file():
        return json.loads(meta.read_text())["prompt_format"]
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def prompt_ids(tokenizer, prompt: str, fmt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids of a user prompt, rendered as the model expects, ready for its answer
    (a chat opens with `system_prompt` when one is given)."""
    if fmt == "chat":
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        out = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])
    return tokenizer(render_alpaca(prompt, "")[0])["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens the tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(i for i in ids if i is not None)


def _cut_at_stop_strings(text: str) -> str:
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


def _next_token(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    """Greedy at temperature 0; else nucleus sampling over the smallest set with mass top_p."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1)
    return int(order[choice])


@torch.no_grad()
def generate(
    module: nn.Module,
    tokenizer,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    sharded: bool = False,
) -> str:
    """The decoded continuation of `ids` (special tokens skipped, cut at the stops above).

    Unsharded: Hugging Face `generate` with its KV cache. Sharded (FSDP): every rank runs the
    same full forward per token (`module.last_logits`), so parameters are gathered in step;
    with sampling, every rank must draw the same numbers (the trainer seeds them alike).
    """
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    stops = stop_token_ids(tokenizer)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    if sharded:
        new = _generate_sharded(module, prompt, stops, max_new_tokens, temperature, top_p)
    else:
        # Compiled decoder layers would recompile for every KV-cache length: decode eagerly.
        eager = getattr(torch.compiler, "set_stance", None)
        stance = eager("force_eager") if eager else contextlib.nullcontext()
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p)
            if temperature > 0
            else dict(do_sample=False)
        )
        with stance, module.autocast(device.type):
            out = module.lm.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id or stops[0],
                stop_strings=list(STOP_STRINGS),
                tokenizer=tokenizer,
                **sampling,
            )
        new = out[0, len(ids) :].tolist()
    module.train(was_training)
    return _cut_at_stop_strings(tokenizer.decode(new, skip_special_tokens=True))


def _generate_sharded(module, ids, stops, max_new_tokens, temperature, top_p) -> list[int]:
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = _next_token(module.last_logits(input_ids=ids)[0], temperature, top_p)
        new.append(nxt)
        if nxt in stops:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return new


def generate_text(
    model: str,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    fmt: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
) -> str:
    """`sftune generate`: a saved model's (or preset's) response to one prompt."""
    from sftune.train import distributed
    from sftune.train.lora import load_for_inference
    from sftune.train.module import CausalLMWithLoss

    dev = distributed.resolve_device(device, distributed.World())
    lm, tokenizer, info = load_for_inference(model, device=dev, dtype=dtype)
    torch.manual_seed(seed)
    # final/sftune.json sits beside final/adapter: look in the directory given, then its parent.
    here = Path(model).expanduser()
    meta_dir = next((d for d in (here, here.parent) if (d / FORMAT_FILE).is_file()), info.source)
    fmt = prompt_format(meta_dir, tokenizer, fmt)
    meta = Path(meta_dir) / FORMAT_FILE
    system_prompt = json.loads(meta.read_text()).get("system_prompt") if meta.is_file() else None
    return generate(
        CausalLMWithLoss(lm, fused=False),
        tokenizer,
        prompt_ids(tokenizer, prompt, fmt, system_prompt),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
