"""The console: a tqdm bar over optimizer steps, and a sub-bar while validation runs.

    bar = ConsoleProgress(total_steps=1000, initial=resumed_step, enabled=is_main)
    bar.update(train_loss=1.93, lr=2e-5, tokens_per_s=41000)
    with bar.eval_bar(total=forwards) as val:   # "validation: 12/40 [00:03<00:07, ...batch/s]"
        for batch in batches:
            ...
            val.update()
    bar.write("saved checkpoint step 500")      # a line that does not break the bar
    bar.close()

Only the main process (rank 0) prints; other ranks, and a disabled bar, print nothing and
cost nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from sftune.train.metrics import is_main_process

# Short names for the postfix (keyword arguments cannot contain "/").
_POSTFIX_NAMES = {"train_loss": "loss", "tokens_per_s": "tok/s", "tok_s": "tok/s"}


class _Closable:
    """A tqdm bar held in `_bar` (None when disabled), closed once, usable with `with`."""

    _bar: Any = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConsoleProgress(_Closable):
    """A tqdm bar over optimizer steps with loss / lr / tok/s and an ETA.

    When stderr is not a terminal (CI, a log file) the bar redraws at most every 5 s so the
    log is not flooded; when disabled nothing is printed at all.
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self.enabled = enabled and is_main_process()
        self._bar = None
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            mininterval=_min_interval(),
            file=sys.stderr,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            shown = {_POSTFIX_NAMES.get(k, k): _short(v) for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def eval_bar(self, total: int, desc: str = "validation") -> EvalBar:
        """A sub-bar on the line below this one for `total` validation batches, with its own
        ETA: validation can take minutes, during which the step bar would otherwise sit still.
        It disappears when closed (leave=False); a no-op when this bar is disabled."""
        if self._bar is None:
            return EvalBar(None)
        from tqdm import tqdm

        sub = tqdm(
            total=total,
            desc=desc,
            unit="batch",
            position=1,  # the step bar holds line 0
            leave=False,
            dynamic_ncols=True,
            mininterval=_min_interval(),
            file=sys.stderr,
        )
        return EvalBar(sub)

    def write(self, msg: str) -> None:
        if self._bar is None:
            return
        self._bar.write(msg)


class EvalBar(_Closable):
    """The validation sub-bar from `ConsoleProgress.eval_bar`; `n` counts batches even when
    nothing is shown. Use it as a context manager so that it is erased on errors too."""

    def __init__(self, bar: Any):
        self._bar = bar
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)


def _min_interval() -> float:
    # Off a terminal every redraw is a new line in the log: redraw at most every 5 s there.
    return 0.1 if sys.stderr.isatty() else 5.0


def _short(value: Any) -> str:
    """A compact postfix value: 1.235, 2.000e-05, 41000; tensors and numpy scalars unwrapped."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        if 0 < abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
