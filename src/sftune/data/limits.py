"""Bounds on rendering a chat template: a time limit and an output size limit.

A chat template is code from whoever made the tokenizer. transformers compiles it in jinja's
sandbox, which stops it reaching Python's internals but not running forever: each `range` may
have 100,000 items, so two nested loops over `range(100000)` run 10^10 times. `bounded` wraps a
compiled template so that a render stops, with a one-line error, once it has run
`RENDER_SECONDS` or written `RENDER_MAX_CHARS`:

    >>> render = bounded(_compile_jinja_template(template))  # doctest: +SKIP
    >>> render(messages=[...], add_generation_prompt=False)  # doctest: +SKIP
    RenderLimitError: rendering took over 10 s (RENDER_SECONDS in sftune/data/limits.py): ...

The time limit is per record when the caller says where a record starts (`within_budget`):
finding the trained turns renders each prefix of a conversation, so a record of thousands of
short turns makes thousands of quick renders (with SmolLM2's template on one CPU core, 1,000
messages took 3 s, 4,000 took 58 s).

How, without a thread to kill or a signal (which only the main thread may take): the template
is run with `generate`, which yields its output piece by piece, and with its own `range`,
whose iterator looks at the clock every 1,024 items. The time and size are checked at each
piece written and on those range steps, so a loop that writes and a loop that only counts are
both stopped. A single expression that takes long by itself (a filter over a huge string) is
not interrupted; the record size limit (`formats.MAX_RECORD_BYTES`) bounds its input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from sftune.data.formats import MAX_RECORD_BYTES

RENDER_SECONDS = 10.0  # all the renders of one record; a real chat record takes about 0.1 ms
# Output of one render: a template writes each message once or twice, plus its own text.
RENDER_MAX_CHARS = 4 * MAX_RECORD_BYTES
_CHECK_EVERY = 1024  # range items between looks at the clock


class RenderLimitError(RuntimeError):
    """A chat template ran too long or wrote too much (one line, for the caller to place)."""


def bounded(template: Any) -> Callable[..., str]:
    """A function of the template's variables returning its text, as `template.render`, that
    raises `RenderLimitError` past `RENDER_SECONDS` or `RENDER_MAX_CHARS` (read at each
    render). `template`: a `jinja2.Template`. Its `stream` attribute yields the same text piece
    by piece, as the template writes it (`templates.py` notes where each message starts)."""
    from jinja2.sandbox import safe_range

    def stream(**variables: Any) -> Iterator[str]:
        seconds, max_chars = RENDER_SECONDS, RENDER_MAX_CHARS
        deadline = _record_deadline.get() or time.monotonic() + seconds

        def bounded_range(*args: int) -> _Range:
            return _Range(safe_range(*args), deadline, seconds)  # the sandbox's size limit too

        size = 0
        for part in template.generate(**variables, range=bounded_range):
            size += len(part)
            if size > max_chars:
                raise RenderLimitError(
                    f"rendering wrote over {max_chars:,} characters (RENDER_MAX_CHARS in "
                    "sftune/data/limits.py): a loop that repeats its output?"
                )
            _check_clock(deadline, seconds)
            yield part

    def render(**variables: Any) -> str:
        return "".join(stream(**variables))

    render.stream = stream
    return render


_record_deadline: ContextVar[float | None] = ContextVar("sftune_render_deadline", default=None)


def within_budget(render: Callable[[Any], Any], record: Any) -> Any:
    """`render(record)`, every template render it makes sharing one `RENDER_SECONDS`."""
    token = _record_deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        return render(record)
    finally:
        _record_deadline.reset(token)


def _check_clock(deadline: float, seconds: float) -> None:
    if time.monotonic() > deadline:
        raise RenderLimitError(
            f"rendering took over {seconds:g} s (RENDER_SECONDS in sftune/data/limits.py): "
            "a template loop that does not end, or a record of very many turns?"
        )


class _Range(Sequence):
    """A `range` for templates whose iteration stops at the render's deadline. Length,
    indexing, `in` and `reversed` behave as the range's (filters such as `length` use them)."""

    def __init__(self, items: range, deadline: float, seconds: float):
        self._items, self._deadline, self._seconds = items, deadline, seconds

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        item = self._items[index]
        return _Range(item, self._deadline, self._seconds) if isinstance(item, range) else item

    def __contains__(self, value: object) -> bool:
        return value in self._items

    def __iter__(self) -> Iterator[int]:
        return self._steps(self._items)

    def __reversed__(self) -> Iterator[int]:
        return self._steps(reversed(self._items))

    def _steps(self, items) -> Iterator[int]:
        for count, value in enumerate(items):
            if count % _CHECK_EVERY == 0:
                _check_clock(self._deadline, self._seconds)
            yield value

    def __repr__(self) -> str:
        return repr(self._items)
