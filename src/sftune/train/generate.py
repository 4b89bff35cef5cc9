"""Text generation from a (training or saved) model: greedy or sampled, stopping where the
answer ends.

    ids = prompt_ids(tokenizer, "What is 12 * 7?", "alpaca")
    text = generate(module, tokenizer, ids, max_new_tokens=128, temperature=0.7, top_p=0.9)
    sftune generate --model runs/x/final --prompt "What is 12 * 7?" --temperature 0.7
    sftune generate --model runs/x/final --prompt "Hi" --system-prompt "Answer in French."
    sftune generate --model runs/x/final --messages chat.json   # its next assistant turn
    sftune generate --model runs/x/final                        # a chat on the terminal
    answers = generate_batch(module, tokenizer, [ids_a, ids_b], max_new_tokens=128)
    sftune generate --model runs/x/final --data train.jsonl --num-samples 4 \
        --temperature 0.7 --out samples.jsonl     # K answers per record: sftune.sampling

A `--messages` file is a conversation as JSON: a list of messages, or an object with
`messages` and `tools` (OpenAI's shape, validated as training chats are); the model writes the
next assistant turn, rendered with the chat template. Without a prompt on a terminal,
`sftune generate` is an interactive chat that keeps its history (`/exit` or Ctrl-D quits).

Generation stops at the EOS token, at a chat template's end-of-turn token, and at the Alpaca
template's next "### Instruction:" (a model that has not learnt to stop would otherwise run on
into a new task until the token limit).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftune.data.templates import render_alpaca
from sftune.errors import DataError, SftuneError

PROMPT_FORMATS = ("auto", "alpaca", "chat")
FORMAT_FILE = "sftune.json"  # written into final/: the prompt format the model was tuned with
STOP_STRINGS = ("### Instruction:",)
# End-of-turn tokens of common chat templates (Llama 3, ChatML, Gemma), used when present.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def tuned_meta(cfg, prompt_format: str, data_format: str | None) -> dict[str, Any]:
    """sftune.json of a model tuned with the resolved config `cfg` (final/, `sftune export`):
    how `generate` and `eval` should prompt it and at which length to score it."""
    meta: dict[str, Any] = {"prompt_format": prompt_format, "seq_length": cfg.data.seq_length}
    if data_format:  # checkpoints written before sftune recorded it have none
        meta["data_format"] = data_format
    meta["train_on"] = cfg.data.train_on
    meta["objective"] = cfg.loss.objective  # sft, or the preference objective (dpo, ...)
    if cfg.loss.objective != "sft":  # what `sftune eval --data pairs.jsonl` scores with
        meta["preference"] = {
            "beta": cfg.loss.beta,
            "simpo_gamma": cfg.loss.simpo_gamma,
            "nll_weight": cfg.loss.nll_weight,
            "ref_model": cfg.loss.ref_model or cfg.model.model,  # the reference it was tuned to
        }
    if prompt_format == "chat" and cfg.data.system_prompt:
        meta["system_prompt"] = cfg.data.system_prompt  # what it was tuned with
    return meta


def tuned_settings(model: str | Path) -> tuple[dict[str, Any], Path | None]:
    """What sftune recorded of how a model directory was tuned (sftune.json: prompt_format,
    seq_length, train_on, data_format, system_prompt) and the file; ({}, None) for a preset or
    a model sftune did not tune. final/sftune.json sits beside final/adapter: the directory
    given is searched, then its parent."""
    here = Path(model).expanduser()
    if not here.is_dir():
        return {}, None
    for meta in (here / FORMAT_FILE, here.parent / FORMAT_FILE):
        if not meta.is_file():
            continue
        try:
            values = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SftuneError(f"{meta}: not readable JSON ({e}); delete it or fix it") from None
        if not isinstance(values, dict):
            raise SftuneError(f"{meta}: expected a JSON object")
        return values, meta
    return {}, None


def prompt_format(meta: dict[str, Any] | None, tokenizer, requested: str = "auto") -> str:
    """ "alpaca" or "chat". auto: what sftune tuned the model with (`meta`, its sftune.json),
    else the chat template when the tokenizer has one, else Alpaca."""
    if requested != "auto":
        return requested
    if meta and meta.get("prompt_format") in ("alpaca", "chat"):
        return meta["prompt_format"]
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of a conversation rendered by the chat template, ready for the next
    assistant turn."""
    out = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def prompt_ids(tokenizer, prompt: str, fmt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids of a user prompt, rendered as the model expects, ready for its answer
    (a chat opens with `system_prompt` when one is given)."""
    if fmt == "chat":
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return chat_ids(tokenizer, [*system, {"role": "user", "content": prompt}])
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
    if not sharded:
        return generate_batch(
            module,
            tokenizer,
            [ids],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
        )[0]
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    stops = stop_token_ids(tokenizer)
    new = _generate_sharded(module, prompt, stops, max_new_tokens, temperature, top_p)
    module.train(was_training)
    return _cut_at_stop_strings(tokenizer.decode(new, skip_special_tokens=True))


@torch.no_grad()
def generate_batch(
    module: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The decoded continuation of each prompt, generated together (Hugging Face `generate`
    with its KV cache). The prompts are left-padded to one width and masked, so each row
    continues from its own last token, its positions counted from its own first token; a row
    stops at its own EOS (or end-of-turn token, or stop string) while the others go on.
    Greedy in fp64, a row's answer is the one it gets alone (tests/test_sampling.py); in bf16
    the batch's shapes may round a near tie the other way. Sampled, the draws depend on the
    batch (one random stream feeds all rows): the same seed and batches give the same samples.
    """
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(ids) for ids in prompts)
    batch = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device
    )
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
            batch,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            stop_strings=list(STOP_STRINGS),
            tokenizer=tokenizer,
            **sampling,
        )
    module.train(was_training)
    return [
        _cut_at_stop_strings(tokenizer.decode(row, skip_special_tokens=True))
        for row in out[:, width:].tolist()
    ]


def _generate_sharded(module, ids, stops, max_new_tokens, temperature, top_p) -> list[int]:
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = _next_token(module.last_logits(input_ids=ids)[0], temperature, top_p)
        new.append(nxt)
        if nxt in stops:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return new


def read_messages(path: str | Path) -> tuple[list[dict], list[dict] | None]:
    """A --messages file: a JSON list of messages, or {"messages": [...], "tools": [...]},
    checked as a training chat is; it must end where the assistant speaks next (a user turn
    or a tool result). One-line errors naming the file and the field."""
    from sftune.data.chat import ASSISTANT, parse_chat

    file = Path(path).expanduser()
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(file, "no such file (--messages)") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(file, f"cannot read (--messages): {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(file, f"not valid JSON ({e.msg})", line=e.lineno) from None
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"messages", "tools"})
        if unknown:
            raise DataError(file, "unknown key (expected messages and tools)", field=unknown[0])
        messages, tools = raw.get("messages"), raw.get("tools")
    elif isinstance(raw, list):
        messages, tools = raw, None
    else:
        raise DataError(file, 'expected a list of messages or {"messages": [...], "tools": [...]}')
    chat = parse_chat(file, messages, tools, line=None, key="messages")
    last = chat.messages[-1]["role"]
    if last in (ASSISTANT, "system"):
        raise DataError(
            file,
            f"ends with {'an assistant turn' if last == ASSISTANT else 'the system message'}: "
            "end it with the user turn (or tool result) that the model should answer",
            field="messages",
        )
    return list(chat.messages), list(chat.tools) if chat.tools else None


@dataclass
class Generator:
    """A loaded model that answers prompts and conversations (`sftune generate`)."""

    module: nn.Module
    tokenizer: Any
    fmt: str  # "alpaca" or "chat"
    system_prompt: str | None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    def _run(self, ids: list[int]) -> str:
        return generate(
            self.module,
            self.tokenizer,
            ids,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        """A user prompt's ids, rendered as the model expects (`fmt`, the system prompt)."""
        return prompt_ids(self.tokenizer, prompt, self.fmt, self.system_prompt)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation's ids, ready for the next assistant turn (opened with the system
        prompt when it has no system message)."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return chat_ids(self.tokenizer, messages, tools)

    def answer(self, prompt: str) -> str:
        return self._run(self.prompt_ids(prompt))

    def reply(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The next assistant turn of a conversation."""
        return self._run(self.chat_ids(messages, tools))

    def continue_all(self, prompts: list[list[int]]) -> list[str]:
        """The answers to several prompts' ids, generated in one batch."""
        return generate_batch(
            self.module,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )


def load_generator(
    model: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    fmt: str = "auto",
    system_prompt: str | None = None,
    chat: bool = False,
    dtype: str = "auto",
    device: str = "auto",
) -> Generator:
    """A saved model (or preset) ready to generate. `chat`: conversations will be given
    (--messages), which need the chat template whatever the tuned format. The system prompt
    is `system_prompt`, else the one the model was tuned with (sftune.json)."""
    from sftune.models import quiet_libraries
    from sftune.train import distributed
    from sftune.train.module import CausalLMWithLoss
    from sftune.transforms.lora import load_for_inference

    quiet_libraries(verbose=False)
    dev = distributed.resolve_device(device, distributed.World())
    lm, tokenizer, _ = load_for_inference(model, device=dev, dtype=dtype)
    torch.manual_seed(seed)
    meta, _ = tuned_settings(model)
    fmt = "chat" if chat else prompt_format(meta, tokenizer, fmt)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SftuneError(
            f"{model}: its tokenizer has no chat template, which "
            f"{'--messages needs' if chat else '--prompt-format chat needs'}"
        )
    if fmt == "alpaca" and system_prompt:
        raise SftuneError(
            f"--system-prompt: {model} takes Alpaca prompts, which have no system message "
            "(--prompt-format chat renders the tokenizer's chat template instead)"
        )
    if fmt == "chat" and system_prompt is None:
        system_prompt = meta.get("system_prompt")  # what it was tuned with
    return Generator(
        CausalLMWithLoss(lm, fused=False),
        tokenizer,
        fmt,
        system_prompt,
        max_new_tokens,
        temperature,
        top_p,
    )


EXIT_COMMANDS = ("/exit", "/quit")


def chat_loop(gen: Generator, read: Callable[[str], str] = input, write=print) -> int:
    """An interactive chat: each line is a user turn, answered with the history so far (with
    Alpaca, which has no turns, each line is answered on its own). `/exit`, `/quit` or
    end of input (Ctrl-D) quit. Returns the number of turns answered."""
    history: list[dict] = []
    write(
        f"sftune: chat ({gen.fmt} format"
        + ("; each prompt on its own" if gen.fmt == "alpaca" else "")
        + f"); {' or '.join(EXIT_COMMANDS)} or Ctrl-D to quit"
    )
    turns = 0
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("")
            return turns
        if line.strip() in EXIT_COMMANDS:
            return turns
        if not line.strip():
            continue
        if gen.fmt == "alpaca":
            text = gen.answer(line)
        else:
            history.append({"role": "user", "content": line})
            text = gen.reply(history)
            history.append({"role": "assistant", "content": text})
        write(text)
        turns += 1
