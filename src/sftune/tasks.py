"""Which lm-eval tasks exist and what they need, checked before torch or lm-eval is imported.

Task accuracy comes from EleutherAI's lm-evaluation-harness (`pip install 'sftune[eval]'`),
run offline on local data files (sftune.train.harness runs it):

    sftune eval --model runs/x/final --tasks gsm8k --task-data gsm8k=test.jsonl --limit 100
    sftune train ... --eval-tasks gsm8k --task-data gsm8k=test.jsonl --eval-tasks-every 100

A task is an lm-eval task YAML. sftune ships `gsm8k` (eval_tasks/gsm8k.yaml: the question,
zero-shot, the answer read from its `#### N` line); `--task-dir DIR` adds every task YAML under
DIR (one of the same name replaces sftune's). `--task-data TASK=FILE` gives a task its test
data: the file becomes its `data_files`, read by the `datasets` builder its extension names
(.jsonl -> json), so a copy of an upstream YAML that names a hub dataset runs on a local file
unchanged. Nothing is fetched from a hub: a task whose data is neither given nor local is
refused here.

    specs = resolve_tasks("gsm8k", "gsm8k=test.jsonl", task_dir=None)   # [TaskSpec(...)]

The prompt follows the format the model was tuned with (`--prompt-format`, auto: the model's
sftune.json): `chat` hands each task's prompt (its `doc_to_text`) to the chat template as the
user message (lm-eval's `apply_chat_template`); `alpaca` wraps it in the Alpaca template that
sftune trains prompt/response records with (`prompt_overrides`). A task whose `doc_to_text` is
a Python function keeps its own prompt under Alpaca: sftune cannot see into it.

Standard library and yaml only.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sftune.data import formats
from sftune.data.templates import ALPACA_PROMPT_TEMPLATE
from sftune.errors import ConfigError, DataError

SHIPPED_DIR = Path(__file__).parent / "eval_tasks"
# `datasets` builders that read local files, by the data file's extension.
BUILDERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".csv": "csv", ".parquet": "parquet"}
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
INSTALL = "pip install 'sftune[eval]'"
# Set (unless the user set them) before datasets and the hub are imported: no lookups at all.
OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class TaskSpec:
    """One task to run: its YAML and what sftune sets in it (lm-eval's own keys)."""

    name: str
    yaml_path: Path
    overrides: dict[str, Any]  # e.g. {"dataset_path": "json", "dataset_kwargs": {...}}


class _Loader(yaml.SafeLoader):
    """Reads lm-eval YAMLs without running them: `!function` tags become None."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


MAX_INCLUDE_DEPTH = 32  # `include:` files nested deeper than this are refused, not followed


def read_task_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task YAML with its `include:` files merged in (their keys first, as lm-eval does).

    A file that includes itself, directly or through others, is a `ConfigError` naming the
    cycle (lm-eval would recurse until it crashes), and so is a chain deeper than
    `MAX_INCLUDE_DEPTH`.
    """
    chain = (*_chain, Path(os.path.abspath(path)))
    cfg = _read_one(path)
    includes = cfg.pop("include", None) or []
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        target = path.parent / str(inc)
        if Path(os.path.abspath(target)) in chain or _same_file(target, chain):
            cycle = " -> ".join(p.name for p in (*chain, Path(target)))
            raise ConfigError(
                f"{chain[0]}: include: cycle {cycle}: a task YAML cannot include itself"
            )
        if len(chain) >= MAX_INCLUDE_DEPTH:
            raise ConfigError(f"{chain[0]}: include: more than {MAX_INCLUDE_DEPTH} files deep")
        merged.update(read_task_yaml(target, chain))
    merged.update(cfg)
    return merged


def _read_one(path: Path) -> dict[str, Any]:
    """One task YAML as it is, its `include:` not followed."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable task YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a task YAML (expected a mapping)")
    return cfg


def _same_file(target: Path, chain: tuple[Path, ...]) -> bool:
    """`target` is one of `chain` under another name (a link, `..`)."""
    try:
        return any(os.path.samefile(target, p) for p in chain)
    except OSError:
        return False  # a missing include: reading it names it


def known_tasks(task_dir: str | None = None) -> dict[str, Path]:
    """Task name -> YAML file: sftune's own, then --task-dir's (which win)."""
    dirs = [SHIPPED_DIR]
    if task_dir:
        path = Path(task_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--task-dir {task_dir}: no such directory")
        dirs.append(path)
    found: dict[str, Path] = {}
    for root in dirs:
        for path in sorted(root.rglob("*.yaml")):
            try:
                # The file's own `task:` names it even when its includes fail: asking for
                # that task then gives their error, not "unknown task".
                name = _read_one(path).get("task") or read_task_yaml(path).get("task")
            except ConfigError:
                continue  # lm-eval skips what it cannot read, too
            if isinstance(name, str):
                found[name] = path.resolve()
    return found


def parse_pairs(text: str | None, flag: str = "--task-data") -> dict[str, str]:
    """ "gsm8k=a.jsonl,math=b.jsonl" -> {"gsm8k": "a.jsonl", "math": "b.jsonl"}."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"{flag}: expected TASK=FILE, got {pair!r}")
        out[name.strip()] = path.strip()
    return out


def split_names(text: str | None) -> list[str]:
    """ "gsm8k, math" -> ["gsm8k", "math"] (--tasks, --eval-tasks)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def go_offline() -> None:
    for name in OFFLINE:
        os.environ.setdefault(name, "1")


def check_installed() -> None:
    """lm-eval is importable (found without importing it)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"task evaluation needs lm-eval: {INSTALL}")


def resolve_tasks(
    tasks: str | list[str], task_data: str | None = None, task_dir: str | None = None
) -> list[TaskSpec]:
    """The tasks to run, each with a local data file that exists and reads; one-line errors
    (naming the task, flag or path) otherwise."""
    names = split_names(tasks) if isinstance(tasks, str) else list(tasks)
    known = known_tasks(task_dir)
    data = parse_pairs(task_data)
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--tasks: unknown task {name!r}; known: {', '.join(sorted(known))} "
                "(add task YAMLs with --task-dir)"
            )
    for name in data:
        if name not in names:
            raise ConfigError(f"--task-data {name}=...: {name!r} is not one of the tasks asked for")
    return [_spec(name, known[name], data.get(name)) for name in names]


def prompt_overrides(spec: TaskSpec, fmt: str) -> dict[str, Any]:
    """What sets a task's prompt in the format `fmt` ("alpaca" or "chat"): for Alpaca, its
    doc_to_text wrapped in the Alpaca prompt (a field name, which lm-eval reads as the
    record's field, becomes that field's template); nothing for chat, whose template lm-eval
    applies, and nothing for a doc_to_text that is a function (left as the task renders it)."""
    if fmt != "alpaca":
        return {}
    text = read_task_yaml(spec.yaml_path).get("doc_to_text")
    if not isinstance(text, str):
        return {}
    if "{{" not in text and "{%" not in text and re.fullmatch(r"[A-Za-z_]\w*", text):
        text = "{{" + text + "}}"
    return {"doc_to_text": ALPACA_PROMPT_TEMPLATE.replace("{prompt}", text)}


def _spec(name: str, path: Path, data_file: str | None) -> TaskSpec:
    cfg = read_task_yaml(path)
    overrides: dict[str, Any] = {}
    if data_file is not None:
        file = Path(data_file).expanduser()
        try:
            formats.data_file(file)  # a directory or a FIFO is named as such (and never opened)
        except DataError as e:
            raise DataError(file, f"{e.problem} (--task-data {name})") from None
        overrides = _local_data(cfg, file)
        check_first_record(file, cfg)
    else:
        _check_own_data(name, cfg)
    return TaskSpec(name, path, overrides)


def _local_data(cfg: dict[str, Any], file: Path) -> dict[str, Any]:
    """The keys that make a task read `file` as its test split."""
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    builder = cfg.get("dataset_path")
    if builder not in LOCAL_BUILDERS:
        builder = BUILDERS.get(file.suffix, "json")
    kwargs = {"data_files": {split: str(file.resolve())}}
    return {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": kwargs}


def _data_files(cfg: dict[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = list(files.values())
    if isinstance(files, str):
        files = [files]
    flat = []
    for f in files or []:
        flat += f if isinstance(f, list) else [f]
    return [f for f in flat if isinstance(f, str)]


def _check_own_data(name: str, cfg: dict[str, Any]) -> None:
    """A task without --task-data: its YAML must name local files that exist."""
    files = _data_files(cfg)
    source = cfg.get("dataset_path")
    if not files and (source in LOCAL_BUILDERS or not Path(str(source)).expanduser().exists()):
        what = _record_fields(cfg)
        raise ConfigError(
            f"--tasks {name}: no local data; add --task-data {name}=FILE"
            + (f" (JSON Lines of {'/'.join(what)} records)" if what else "")
            + ("" if source in LOCAL_BUILDERS else f": sftune never downloads {source!r}")
        )
    for f in files:
        if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
            raise DataError(f, f"no such file (data_files of task {name})")


_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_]\w*)")


def _record_fields(cfg: dict[str, Any]) -> list[str]:
    """The record fields a task's prompt and target read (`{{question}}`, `{{answer.split...}}`)."""
    text = " ".join(str(cfg.get(k) or "") for k in ("doc_to_text", "doc_to_target"))
    return list(dict.fromkeys(_VARIABLE.findall(text)))


def check_first_record(file: Path, cfg: dict[str, Any]) -> None:
    """The first record of a JSON Lines file has the fields the task reads."""
    if BUILDERS.get(file.suffix) != "json" or file.suffix == ".json":
        return
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            numbered = ((i, line) for i, line in enumerate(f, start=1) if line.strip())
            line_no, line = next(numbered, (1, ""))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(file, f"cannot read ({e})") from None
    if not line:
        raise DataError(file, "no records")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(file, f"not valid JSON ({e.msg})", line=line_no) from None
    except RecursionError:
        raise DataError(file, "JSON nested too deeply", line=line_no) from None
    if not isinstance(record, dict):
        raise DataError(file, "expected a JSON object per line", line=line_no)
    for field in _record_fields(cfg):
        if field not in record:
            raise DataError(file, "missing (the task reads it)", line=line_no, field=field)
