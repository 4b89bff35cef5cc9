"""Render records into training text, and find the characters that are trained.

Prompt/response and Alpaca records use the Alpaca template; the response starts at character
`len(prompt_part)`:

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

Chats are rendered by the tokenizer's own chat template (transformers' `render_jinja_template`,
exactly what `apply_chat_template` renders, tools included). `DocumentRenderer` finds each
trained turn by rendering prefixes of the conversation with the same template: message i
starts where the conversation up to it ends (for an assistant turn: with the generation prompt,
so the assistant header is not trained) and ends where the conversation up to and including
it ends. Each prefix must be a prefix of the full rendering; a template for which it is not
(one that renders earlier turns differently once more follow) is refused, never guessed at.
Whitespace after a turn's end-of-turn token (ChatML's `<|im_end|>` then a newline) belongs to
the template's layout and is not trained; the end-of-turn token is.

Rendering every prefix is quadratic in the number of turns (a 200-turn agent transcript took
0.4-0.7 s, a 4,000-message one ran past `RENDER_SECONDS`). For the templates sftune ships
(`--chat-template chatml|llama3`), whose text is one header, then one piece per message that
reads only that message, then the generation prompt, the prefix lengths are read off a single
render instead: the message list notes how much had been written when the loop fetched each
message, which is the length of the conversation before it (`_Tracked`). Same texts and
spans, one render (a test compares both ways). SmolLM2-Instruct's own template has that shape
too. Any other template renders every prefix.

`--train-on` (`TRAIN_ON`): `all` trains every token; `assistant` every assistant turn; `last`
the final assistant turn. A message's `"train": true/false` (or `"weight": 1/0`) overrides the
mode for that turn. The EOS that ends a document is trained when its last message is.

    >>> trained_turns(["system", "user", "assistant", "user", "assistant"], [None] * 5, "assistant")
    [False, False, True, False, True]
    >>> trained_turns(["user", "assistant", "user", "assistant"], [None, False, None, None], "all")
    [True, False, True, True]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sftune.data.chat import ASSISTANT
from sftune.data.chat_templates import CHATML, HINT, LLAMA3
from sftune.data.formats import CHAT_FORMATS, Record
from sftune.data.limits import bounded
from sftune.errors import ConfigError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
)
# Everything before the response; the template ends with "{response}", so the prompt part
# of a rendered text is exactly this prefix with the prompt filled in.
ALPACA_PROMPT_TEMPLATE = ALPACA_TEMPLATE.removesuffix("{response}")
assert ALPACA_PROMPT_TEMPLATE + "{response}" == ALPACA_TEMPLATE

TRAIN_ON = ("all", "assistant", "last")
# The shipped templates render tool calls and tools lists (`chat_templates.py`).
TOOLS_HINT = "--chat-template chatml (or llama3, or a Jinja FILE that renders them)"
TRAIN_ON_CHOICES = ("auto", *TRAIN_ON)
# SmolLM2-Instruct's own template (the smollm2-135m preset's tokenizer, byte for byte): the
# default model's chats without --chat-template.
SMOLLM2_INSTRUCT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Templates whose render of messages[:k] is exactly what their render of the whole conversation
# has written when its message loop fetches message k (a header that reads only messages[0],
# the first user turn and the tools; one piece per message, reading that message alone and
# messages[0]; after the loop only the generation prompt), with the generation prompt each
# appends.
_ONE_PIECE_PER_MESSAGE = {
    CHATML: "<|im_start|>assistant\n",
    LLAMA3: "<|start_header_id|>assistant<|end_header_id|>\n\n",
    SMOLLM2_INSTRUCT: "<|im_start|>assistant\n",
}


def render_alpaca(prompt: str, response: str) -> tuple[str, str]:
    """The Alpaca prompt part and full text of one example (see the module docstring)."""
    prompt_part = ALPACA_PROMPT_TEMPLATE.format(prompt=prompt)
    return prompt_part, prompt_part + response


def resolve_train_on(train_on: str | bool | None, shape: str, response_only: bool = False) -> str:
    """The `TRAIN_ON` mode for records of `shape`: `auto` (or None) is `assistant` for chats and
    `all` for prompt/response and Alpaca; `response_only` (the old flag, kept as an alias) means
    `assistant`. A bool stands for the old `response_only` argument alone: True is `assistant`,
    False `all` (nothing masked, as it was).

        >>> resolve_train_on("auto", "sharegpt"), resolve_train_on("auto", "alpaca")
        ('assistant', 'all')
    """
    if isinstance(train_on, bool):
        return "assistant" if train_on or response_only else "all"
    train_on = train_on or "auto"
    if train_on not in TRAIN_ON_CHOICES:
        raise ConfigError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON_CHOICES)}")
    if response_only:
        if train_on not in ("auto", "assistant"):
            raise ConfigError(f"--response-only means --train-on assistant, not {train_on}")
        return "assistant"
    if train_on == "auto":
        return "assistant" if shape in CHAT_FORMATS else "all"
    return train_on


def trained_turns(roles: Sequence[str], flags: Sequence[bool | None], train_on: str) -> list[bool]:
    """Which messages are trained: the mode's choice, overridden by each message's own flag.

    Raises ValueError when a mode that trains assistant turns finds none.
    """
    if train_on == "all":
        default = [True] * len(roles)
    else:
        assistant = [i for i, role in enumerate(roles) if role == ASSISTANT]
        if not assistant:
            raise ValueError(f"no assistant turn to train on (--train-on {train_on})")
        if train_on == "assistant":
            default = [role == ASSISTANT for role in roles]
        else:
            default = [i == assistant[-1] for i in range(len(roles))]
    return [d if f is None else f for d, f in zip(default, flags, strict=True)]


class Document(NamedTuple):
    """A rendered record and what of it is trained.

    `spans`: trained character ranges of `text`, ascending (None: every character);
    `eos_trained`: the EOS that ends the document is trained; `ends_with_eos`: `text` ends with
    the EOS token's text, so the packer appends none.
    """

    text: str
    spans: tuple[tuple[int, int], ...] | None
    eos_trained: bool
    ends_with_eos: bool


class DocumentRenderer:
    """Render records as `Document`s for one tokenizer and `--train-on` mode.

        >>> renderer = DocumentRenderer(tok, "assistant")  # doctest: +SKIP
        >>> doc = renderer.render(record)  # doctest: +SKIP
        >>> [doc.text[s:e] for s, e in doc.spans]  # doctest: +SKIP
        ['Hello!<|im_end|>', '4<|im_end|>']

    `render` raises ValueError (one line) for a record it cannot render; the caller names the
    file and line.
    """

    def __init__(self, tokenizer: Any, train_on: str):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
        self.train_on = train_on
        self.tokenizer = tokenizer
        self.eos_text = getattr(tokenizer, "eos_token", None)
        self._chat: _ChatTemplate | None = None  # built on the first chat record

    def render(self, record: Record) -> Document:
        if record.messages is not None:
            if self._chat is None:
                self._chat = _ChatTemplate(self.tokenizer)
            return self._render_chat(record)
        prompt_part, text = render_alpaca(record.prompt, record.response)
        if self.train_on == "all":
            return Document(text, None, True, False)
        return Document(text, ((len(prompt_part), len(text)),), True, False)

    def _render_chat(self, record: Record) -> Document:
        chat = self._chat
        messages = list(record.messages)
        roles = [m["role"] for m in messages]
        trained = trained_turns(roles, record.train or [None] * len(roles), self.train_on)
        tools = list(record.tools) if record.tools else None
        chat.check_support(messages, tools)
        full, starts = chat.render_noting_starts(messages, tools)
        spans: list[tuple[int, int]] | None = None
        if self.train_on == "all":
            skipped = [i for i, t in enumerate(trained) if not t]
            if skipped:
                turns = chat.turn_spans(messages, tools, full, skipped, starts)
                spans = _complement(turns, len(full))
        else:
            turns = [i for i, t in enumerate(trained) if t]
            spans = chat.turn_spans(messages, tools, full, turns, starts)
        text, shift = chat.strip_bos(full)
        text, ends = cut_after_final_eos(text, self.eos_text, 0) if self.eos_text else (text, False)
        if spans is not None:
            spans = [
                (min(max(s - shift, 0), len(text)), min(e - shift, len(text))) for s, e in spans
            ]
        return Document(text, None if spans is None else tuple(spans), trained[-1], ends)


class _ChatTemplate:
    """A tokenizer's chat template, rendered as `apply_chat_template` does, and its turn spans.

    The compiled Jinja template is called directly: the records are plain JSON already, so
    transformers' `render_jinja_template` (which copies every conversation into plain types
    first) would only add time, about 40% of a render. A test checks the texts are the same.
    """

    def __init__(self, tokenizer: Any):
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"chat records need a chat template and the tokenizer of {tokenizer_name} has "
                f"none: give one with {HINT}"
            )
        self.template = tokenizer.get_chat_template()
        self.tools_template = tokenizer.get_chat_template(None, tools=[{}])
        self._compiled = {t: _compile(t) for t in {self.template, self.tools_template}}
        self.variables = dict(tokenizer.special_tokens_map)
        # Errors name the --chat-template given, else the tokenizer whose template it is.
        given = getattr(tokenizer, "sftune_chat_template", None)
        self.name = (
            f"--chat-template {given}" if given else f"the chat template of {tokenizer_name}"
        )
        bos = getattr(tokenizer, "bos_token", None)
        self.bos = bos if bos and adds_bos(tokenizer) else None
        # The special tokens the template writes itself (and EOS): a turn's trailing whitespace
        # after one of them is layout, not the turn.
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        sources = f"{self.template}\n{self.tools_template}"
        self.end_markers = tuple(sorted(t for t in specials if t and t in sources))

    def check_support(self, messages: list[dict], tools: list | None) -> None:
        """A template that never reads tool calls (or tools) would drop them silently: refuse."""
        source = self.tools_template if tools else self.template
        if any("tool_calls" in m for m in messages) and "tool_calls" not in source:
            raise ValueError(f"{self.name} does not render tool calls: use {TOOLS_HINT}")
        if tools and "tools" not in source:
            raise ValueError(f"{self.name} does not render a tools list: use {TOOLS_HINT}")

    def render(self, conversations: list[list[dict]], tools: list | None, generation: bool):
        """The texts of `conversations`, as `apply_chat_template(..., tokenize=False)`."""
        template = self._compiled[self.tools_template if tools else self.template]
        try:
            return [
                template(
                    messages=messages,
                    tools=tools,
                    documents=None,
                    add_generation_prompt=generation,
                    **self.variables,
                )
                for messages in conversations
            ]
        except Exception as e:  # a template's raise_exception, a missing key, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{self.name} fails: {first}") from None

    def render_noting_starts(
        self, messages: list[dict], tools: list | None
    ) -> tuple[str, dict[int, int] | None]:
        """The text of the whole conversation and, for a template of `_ONE_PIECE_PER_MESSAGE`,
        the length of the text before each message its loop wrote (message index -> length;
        None for any other template)."""
        source = self.tools_template if tools else self.template
        stream = getattr(self._compiled[source], "stream", None)
        if source not in _ONE_PIECE_PER_MESSAGE or stream is None:
            return self.render([messages], tools, False)[0], None
        parts: list[str] = []
        written = [0]
        starts: dict[int, int] = {}
        tracked = _Tracked(messages, 0, written, starts)
        try:
            for part in stream(
                messages=tracked,
                tools=tools,
                documents=None,
                add_generation_prompt=False,
                **self.variables,
            ):
                parts.append(part)
                written[0] += len(part)
        except Exception as e:  # as `render`: one line naming the template
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{self.name} fails: {first}") from None
        return "".join(parts), starts

    def turn_spans(
        self,
        messages: list[dict],
        tools: list | None,
        full: str,
        turns: list[int],
        starts: dict[int, int] | None = None,
    ) -> list[tuple[int, int]]:
        """Character ranges of `full` that messages `turns` cover (see the module doc).
        `starts`, from `render_noting_starts`: the prefix lengths, read off the one render
        instead of rendering each prefix."""
        if not turns:
            return []
        if starts is not None:
            spans = self._spans_from_starts(messages, tools, full, turns, starts)
            if spans is not None:
                return spans
        roles = [m["role"] for m in messages]
        heads = sorted({i for i in turns if roles[i] == ASSISTANT})
        ends = sorted({i + 1 for i in turns} | {i for i in turns if roles[i] != ASSISTANT})
        ends = [k for k in ends if 0 < k < len(messages)]
        head_at = self._prefix_lengths(messages, tools, full, heads, generation=True)
        end_at = self._prefix_lengths(messages, tools, full, ends, generation=False)
        end_at[0], end_at[len(messages)] = 0, len(full)
        spans = []
        for i in turns:
            start = head_at[i] if roles[i] == ASSISTANT else end_at[i]
            end = self._trim(full, start, end_at[i + 1])
            if end < start:
                raise self._inconsistent(i)
            spans.append((start, end))
        return spans

    def _spans_from_starts(
        self, messages: list[dict], tools: list | None, full: str, turns: list[int], starts
    ) -> list[tuple[int, int]] | None:
        """`turn_spans` from the noted prefix lengths; None where a needed one was not noted
        (a message the header reads, like Llama 3's first user turn beside tools) or the
        generation prompt is not where it should be: the prefixes are rendered then, which
        also gives those records their usual error."""
        header = _ONE_PIECE_PER_MESSAGE[self.tools_template if tools else self.template]
        n = len(messages)
        ends = {**starts, 0: 0, n: len(full)}  # as `turn_spans`: the first turn starts at 0
        spans = []
        for i in turns:
            if i not in ends or i + 1 not in ends:
                return None
            start = ends[i]
            if messages[i]["role"] == ASSISTANT:
                if i == 0 or not full.startswith(header, start):
                    return None
                start += len(header)
            end = self._trim(full, start, ends[i + 1])
            if end < start:
                return None
            spans.append((start, end))
        return spans

    def _prefix_lengths(
        self, messages: list[dict], tools: list | None, full: str, lengths: list[int], generation
    ) -> dict[int, int]:
        texts = self.render([messages[:k] for k in lengths], tools, generation) if lengths else []
        for k, text in zip(lengths, texts, strict=True):
            if not full.startswith(text):
                raise self._inconsistent(k)
        return {k: len(text) for k, text in zip(lengths, texts, strict=True)}

    def _inconsistent(self, k: int) -> ValueError:
        return ValueError(
            f"{self.name} is not prefix-consistent: the conversation up to "
            f"message {k} renders differently from the start of the whole conversation, so its "
            "turns cannot be located (--train-on all trains every token without them)"
        )

    def _trim(self, full: str, start: int, end: int) -> int:
        """`end` before whitespace that follows an end-of-turn token."""
        turn = full[start:end]
        kept = turn.rstrip()
        if len(kept) < len(turn) and kept.endswith(self.end_markers):
            return start + len(kept)
        return end

    def strip_bos(self, text: str) -> tuple[str, int]:
        """(text, characters removed): a template's leading BOS string goes when the tokenizer
        adds the BOS token itself, so there is exactly one."""
        if self.bos and text.startswith(self.bos):
            return text[len(self.bos) :], len(self.bos)
        return text, 0


class _Tracked(list):
    """A conversation's messages that note, as the template's loop fetches message i, how
    much the render had written by then (`starts[i] = written[0]`). A slice (`messages[1:]`,
    how Llama 3's template drops the system message) notes the same indices."""

    def __init__(self, items, first: int, written: list[int], starts: dict[int, int]):
        super().__init__(items)
        self._first, self._written, self._starts = first, written, starts

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step in (None, 1):
            start = index.indices(len(self))[0]
            items = list.__getitem__(self, index)
            return _Tracked(items, self._first + start, self._written, self._starts)
        return list.__getitem__(self, index)

    def __iter__(self):
        for i, message in enumerate(list.__iter__(self)):
            self._starts.setdefault(self._first + i, self._written[0])
            yield message


def _compile(template: str):
    """`template` compiled as transformers compiles chat templates: a function of its variables."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: its public renderer, slower
        from transformers.utils.chat_template_utils import render_jinja_template

        def render(messages, **variables):
            return render_jinja_template([messages], chat_template=template, **variables)[0][0]

        return render
    return bounded(_compile_jinja_template(template))  # a time and size limit: limits.py


def _complement(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The ranges of [0, length) outside `spans`."""
    out, position = [], 0
    for start, end in sorted(spans):
        if start > position:
            out.append((position, start))
        position = max(position, end)
    if position < length:
        out.append((position, length))
    return out


def cut_after_final_eos(text: str, eos_text: str, response_start: int) -> tuple[str, bool]:
    """`text` cut right after a final `eos_text` (trailing whitespace dropped), and whether it was.

    Only an EOS at or after `response_start` counts.

        >>> cut_after_final_eos("<|im_start|>assistant\\nyo<|im_end|>\\n", "<|im_end|>", 23)
        ('<|im_start|>assistant\\nyo<|im_end|>', True)
        >>> cut_after_final_eos("### Response:\\nyo", "<|im_end|>", 14)
        ('### Response:\\nyo', False)
    """
    stripped = text.rstrip()
    if stripped.endswith(eos_text) and len(stripped) - len(eos_text) >= response_start:
        return stripped, True
    return text, False


def render_chat(
    messages: Sequence[dict[str, Any]], tokenizer: Any, tools: Sequence[dict] | None = None
) -> tuple[str, str]:
    """A chat up to its last assistant turn, rendered by the tokenizer's chat template, as
    (prompt part, full text): the prompt part is the messages before that turn with the
    generation prompt, so it ends with the assistant header (what a model is given to answer).

    A template that writes the BOS token itself (Llama 3's `<|begin_of_text|>`) would get a
    second one from the tokenizer's post-processor, so a leading BOS string is removed from
    both parts, but only when the post-processor adds it back (`adds_bos`). SmolLM2 names
    `<|im_start|>` its `bos_token` yet adds nothing when encoding: there the string is the
    chat's first token and stays.

    Raises ValueError when the tokenizer has no chat template, the chat has no assistant turn,
    or the template renders the prompt part so that it is not a prefix of the full text.
    """
    chat = _ChatTemplate(tokenizer)
    messages = list(messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), default=None)
    if last is None:
        raise ValueError("the chat has no assistant turn")
    tools = list(tools) if tools else None
    full = chat.render([messages[: last + 1]], tools, False)[0]
    prompt_part = chat.render([messages[:last]], tools, True)[0]
    if not full.startswith(prompt_part):
        raise ValueError("the chat template renders the prompt differently from the full chat")
    full, shift = chat.strip_bos(full)
    return prompt_part[shift:], full


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text puts the BOS token in front of it (`tokenizer("x")` starts with it)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]


def render_record(record: Record, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt part, full text) of a record: Alpaca for prompt/response, chat for messages."""
    if record.messages is not None:
        return render_chat(record.messages, tokenizer, record.tools)
    return render_alpaca(record.prompt, record.response)


def template_fingerprint() -> str:
    """What of the templates enters the packing cache key (the chat template is the tokenizer's)."""
    return ALPACA_TEMPLATE
