"""The rows of metrics.jsonl: reading them, and the key vocabulary every reader shares.

    rows = read_metrics("runs/alpaca")       # [{"step": 10, "train_loss": 1.93, ...}, ...]
    task_curves(rows)                        # {"task/gsm8k/exact_match/strict-match": [(0, 0.04), ...]}
    format_step_metrics({"rewards/accuracies": 0.625, "rewards/margins": 0.41})
                                             # "acc 0.62 | margin 0.41"

Standard library only (no torch, no matplotlib), so that the writer (sftune.train.metrics),
the learning curve (sftune.train.plot), the lm-eval harness and the loop's console lines all
read rows the same way without importing each other: metrics.py may draw the curve, and the
curve never needs the logger.

Keys a row may hold, besides "step" and "time":

    train_loss, grad_norm, lr, tokens, ...       every objective
    val_loss                                     a validation row
    rewards/chosen, rewards/rejected,            preference objectives (dpo, ipo, simpo, orpo):
    rewards/accuracies, rewards/margins,         train rows; validation rows carry
    logps/chosen, logps/rejected                 val_rewards/accuracies and val_rewards/margins
    task/<task>/<metric>[/<filter>]              lm-eval accuracy, and <metric>_stderr beside it
"""

from __future__ import annotations

import json
from pathlib import Path

from sftune.errors import SftuneError

METRICS_FILE = "metrics.jsonl"
TASK_PREFIX = "task/"  # lm-eval task metrics: task/<task>/<metric>[/<filter>], and <metric>_stderr
REWARD_PREFIX = "rewards/"  # preference objectives; validation rows use "val_" + the same keys
VAL_PREFIX = "val_"
REWARD_ACCURACY = REWARD_PREFIX + "accuracies"  # the share of pairs with chosen reward > rejected
REWARD_MARGIN = REWARD_PREFIX + "margins"  # the mean of chosen minus rejected reward


def is_number(value: object) -> bool:
    """A value to draw or print: null (a non-finite number), missing keys and flags are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise SftuneError(f"{path}:{i + 1}: not valid JSON ({err})") from None
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of `<run_dir>/metrics.jsonl` in order ([] when there is none); null stays None."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def task_curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each task metric logged in `rows` (not its stderr) as (step, value) points, by its key."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(TASK_PREFIX) and "_stderr" not in key and is_number(value):
                curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def task_label(key: str) -> str:
    """ "task/gsm8k/exact_match/strict-match" -> "gsm8k exact_match (strict-match)"."""
    task, metric, *filt = key[len(TASK_PREFIX) :].split("/")
    return f"{task} {metric}" + (f" ({filt[0]})" if filt else "")


def task_stderr_key(key: str) -> str:
    """The key of a task metric's standard error."""
    task, metric, *rest = key[len(TASK_PREFIX) :].split("/")
    return "/".join([TASK_PREFIX + task, metric + "_stderr", *rest])


def is_reward_key(key: str) -> bool:
    """A preference objective's reward metric, on a train row or a validation row."""
    return key.startswith((REWARD_PREFIX, VAL_PREFIX + REWARD_PREFIX))


def has_rewards(rows: list[dict]) -> bool:
    """Whether a preference objective logged `rows` (an SFT run never writes rewards/*)."""
    return any(is_reward_key(k) for row in rows for k in row)


# What the console shows of a step's (or a validation pass's) reward metrics, in this order.
_CONSOLE = ((REWARD_ACCURACY, "acc"), (REWARD_MARGIN, "margin"))


def format_step_metrics(row: dict) -> str:
    """The reward metrics of one logged row for a console line; "" for a row without them.

    A train row gives "acc 0.62 | margin 0.41"; a validation row (val_rewards/...) gives
    "val_acc 0.55 | val_margin 0.30", to sit beside "val_loss 0.6523" as the loop prints it.
    """
    parts = []
    for prefix in ("", VAL_PREFIX):
        for key, short in _CONSOLE:
            value = row.get(prefix + key)
            if is_number(value):
                parts.append(f"{prefix}{short} {value:.2f}")
    return " | ".join(parts)
