"""Render records into training text, returning where the response starts.

Every renderer returns `(prompt_part, full_text)` with `full_text.startswith(prompt_part)`,
so response-only masking knows that the response starts at character `len(prompt_part)`:

    >>> prompt_part, text = render_alpaca("Add 2 and 2.", "4")
    >>> text[len(prompt_part):]
    '4'
    >>> print(text)
    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Add 2 and 2.
    <BLANKLINE>
    ### Response:
    4

There is no newline after the response: the packer appends the EOS token instead (and for a
chat whose template already ends with the EOS text, cuts the text after it: see `tokenize.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftune.data.formats import Record

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
)
# Everything before the response; the template ends with "{response}", so the prompt part
# of a rendered text is exactly this prefix with the prompt filled in.
ALPACA_PROMPT_TEMPLATE = ALPACA_TEMPLATE.removesuffix("{response}")
assert ALPACA_PROMPT_TEMPLATE + "{response}" == ALPACA_TEMPLATE


def render_alpaca(prompt: str, response: str) -> tuple[str, str]:
    """The Alpaca prompt part and full text of one example (see the module docstring)."""
    prompt_part = ALPACA_PROMPT_TEMPLATE.format(prompt=prompt)
    return prompt_part, prompt_part + response


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[str, str]:
    """A chat rendered by the tokenizer's chat template, as (prompt part, full text).

    The prompt part is the messages before the last (assistant) one, rendered with
    `add_generation_prompt=True`, so it ends with the assistant header. A template that
    writes the BOS token itself (Llama 3's `<|begin_of_text|>`) would get a second one from
    the tokenizer's post-processor, so a leading BOS string is removed from both parts, but
    only when the post-processor adds it back (`adds_bos`). SmolLM2 names `<|im_start|>` its
    `bos_token` yet adds nothing when encoding: there the string is the chat's first token
    and stays.

    Raises ValueError when the tokenizer has no chat template, or when the template renders
    the conversation so that the prompt part is not a prefix of the full text.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages records need a tokenizer with a chat template")
    messages = list(messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_part = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    if bos and full.startswith(bos) and prompt_part.startswith(bos) and adds_bos(tokenizer):
        full, prompt_part = full[len(bos) :], prompt_part[len(bos) :]
    if not full.startswith(prompt_part):
        raise ValueError("the chat template renders the prompt differently from the full chat")
    return prompt_part, full


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text puts the BOS token in front of it (`tokenizer("x")` starts with it)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]


def render_record(record: Record, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt part, full text) of a record: Alpaca for prompt/response, chat for messages."""
    if record.messages is not None:
        return render_chat(record.messages, tokenizer)
    return render_alpaca(record.prompt, record.response)


def template_fingerprint() -> str:
    """What of the templates enters the packing cache key (the chat template is the tokenizer's)."""
    return ALPACA_TEMPLATE
