"""Batch sampling: K answers of a model to every prompt of a data file, for building preference
pairs from your own model (rejection sampling, Iterative RPO).

    sftune generate --model runs/sft/final --data gsm8k/train.jsonl \\
        --fields question=prompt,answer=response --num-samples 4 --temperature 0.7 \\
        --batch-size 64 --limit 2000 --out samples.jsonl
    python scripts/gsm8k_pairs.py samples.jsonl pairs.jsonl     # chosen/rejected by `#### N`

The data is read by sftune's SFT readers (`data/formats.py`: prompt/response, Alpaca, OpenAI
messages, ShareGPT; `--fields` maps other names), so the prompt is exactly what training
rendered: a prompt/response or Alpaca prompt in the model's prompt format (`--prompt-format`,
`--system-prompt` as for `--prompt`), a chat with the chat template, without its final
assistant turn if it ends with one. The response (`response`, Alpaca's `output`) may be absent:
a file of prompts alone is fine. Each record gives one row of samples.jsonl:

    {"prompt": "Natalia sold ...", "outputs": ["She sold ... #### 72", ...],   # K strings
     "answer": "Natalia sold 48/2 = ... #### 72",    # the source record's other fields
     "data_file": "gsm8k/train.jsonl", "line": 1}    # where the record came from

`prompt` is the prompt as the file gives it (a string, or the chat's messages), not rendered; the fields it was read from (prompt, or instruction and input,
or the chat's key) are not repeated. A source field named like one of the row's own keys is
an error. Every record is checked before the model loads.

The prompts are expanded K times, ordered longest first (rows of one batch have similar
lengths, and a batch too large for memory fails at once) and generated `--batch-size` rows at a
time, left-padded, each row stopping at its own EOS. The random stream is seeded once
(`--seed`): the same seed, data and settings give the same samples. The file is written once,
atomically, when every sample is in: an interrupted run leaves no file behind, and `--out`
never replaces an existing file. Importing this module imports no torch: the CLI checks the
flags and every record first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from sftune.data import formats
from sftune.data.chat import ASSISTANT
from sftune.errors import DataError, SftuneError
from sftune.files import atomic_write_lines

ROW_KEYS = ("prompt", "outputs", "data_file", "line")


class Prompt(NamedTuple):
    """One record to sample: its prompt (a string, or messages), tools, other fields, line."""

    prompt: str | list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    fields: dict[str, Any]
    line: int

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def check_out(out: str | Path) -> Path:
    """`--out` as a Path: refused if something is there already (a file, a directory)."""
    path = Path(out).expanduser()
    if path.exists() or path.is_symlink():
        raise SftuneError(
            f"--out {out}: already exists; give a new file name (nothing is replaced)"
        )
    return path


def _prompt_keys(shape: str, fields: Mapping[str, str] | None) -> set[str]:
    """The source keys the prompt is read from (not repeated among the row's other fields)."""
    fields = fields or {}
    if shape == formats.ALPACA:
        return {"instruction", "input"}
    if shape in formats.CHAT_FORMATS:
        return {
            fields.get("messages", "messages" if shape == formats.MESSAGES else "conversations")
        }
    return {fields.get("prompt", "prompt")}


def read_prompts(
    path: str | Path, fields: Mapping[str, str] | None = None, limit: int = 0
) -> list[Prompt]:
    """The prompts of a data file (the first `limit`, if > 0), each with its other fields.
    One-line `DataError`s naming the file, line and field."""
    prompts: list[Prompt] = []
    for record, obj in formats.iter_sourced_records(path, fields, need_response=False):
        if not prompts:
            used = _prompt_keys(formats.detect_format(obj, fields), fields)
        other = {k: v for k, v in obj.items() if k not in used}
        clash = next((k for k in ROW_KEYS if k in other), None)
        if clash:
            raise DataError(
                path,
                f"the samples file has its own {clash!r}: rename this field or map it with "
                "--fields",
                line=record.line,
                field=clash,
            )
        if record.messages is None:
            prompts.append(Prompt(record.prompt, None, other, record.line))
        else:
            # A chat that ends with the assistant's answer is asked that answer again.
            messages = list(record.messages)
            if messages[-1]["role"] == ASSISTANT:
                messages.pop()
            if messages[-1]["role"] == "system":
                raise DataError(
                    path,
                    "has only a system message: nothing to answer",
                    line=record.line,
                    field=next(iter(used)),
                )
            tools = list(record.tools) if record.tools else None
            prompts.append(Prompt(messages, tools, other, record.line))
        if limit and len(prompts) == limit:
            break
    return prompts


def sample(
    gen,
    prompts: list[Prompt],
    num_samples: int,
    batch_size: int,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[list[str]]:
    """`num_samples` answers of `gen` (a `train.generate.Generator`) to each prompt, generated
    `batch_size` rows at a time, longest prompts first. `progress(before, done, total)` after
    each batch."""
    ids = [
        gen.chat_ids(p.prompt, p.tools) if p.is_chat else gen.prompt_ids(p.prompt) for p in prompts
    ]
    # Stable: the K rows of one prompt stay together; longest first: an OOM shows at once.
    order = sorted(range(len(prompts) * num_samples), key=lambda j: -len(ids[j // num_samples]))
    outputs: list[list[str]] = [[""] * num_samples for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts = gen.continue_all([ids[j // num_samples] for j in rows])
        for j, text in zip(rows, texts, strict=True):
            outputs[j // num_samples][j % num_samples] = text
        if progress:
            progress(start, start + len(rows), len(order))
    return outputs


def write_samples(
    out: Path, data_file: str | Path, prompts: list[Prompt], outputs: list[list[str]]
) -> None:
    """samples.jsonl, one row per prompt, written atomically (never over an existing file)."""
    rows = (
        json.dumps(
            {
                "prompt": p.prompt,
                "outputs": texts,
                **p.fields,
                "data_file": str(data_file),
                "line": p.line,
            },
            ensure_ascii=False,
        )
        for p, texts in zip(prompts, outputs, strict=True)
    )
    check_out(out)  # again: a file may have appeared while the model sampled
    atomic_write_lines(out, rows)


def print_progress(before: int, done: int, total: int) -> None:
    """A line to stderr at about every tenth of the samples."""
    step = max(1, total // 10)
    if done == total or done // step != before // step:
        print(f"sftune: generate: {done:,}/{total:,} samples", file=sys.stderr, flush=True)
