"""Hostile data files, chat templates and task YAMLs (issue 28 §9, §10): each is one line naming
the file (and line), found before anything blocks, hangs or runs out of memory."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest

from sftune.cli import main
from sftune.data import formats, limits
from sftune.data.formats import peek, read_records
from sftune.errors import ConfigError, DataError
from tiny import byte_tokenizer

RECORD = {"prompt": "p", "response": "r"}
LONG_LINE = json.dumps({"prompt": bytes(range(256)).hex(), "response": "r"}).encode() + b"\n"
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def both_raise(path: Path, match: str) -> None:
    """peek (the CLI's early check) and the full read give the same one-line DataError."""
    for read in (peek, read_records):
        with pytest.raises(DataError, match=match) as info:
            read(path)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- nesting


def test_deeply_nested_json_is_one_line_naming_the_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    first = tmp_path / "first.jsonl"
    first.write_text(f'{{"prompt": {deep}, "response": "r"}}\n')
    both_raise(first, r"first.jsonl:1: JSON nested too deeply")
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps(RECORD) + "\n" + f'{{"prompt": {deep}}}\n')
    with pytest.raises(DataError, match=r"later.jsonl:2: JSON nested too deeply"):
        read_records(later)
    listed = tmp_path / "list.json"
    listed.write_text(f"[{deep}]")
    both_raise(listed, r"list.json: JSON nested too deeply")


# ----------------------------------------------------------------------------- not a file


def test_directory_and_device_are_named_not_missing(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    both_raise(tmp_path / "train.jsonl", r"train.jsonl: is a directory, not a data file")
    both_raise(Path(os.devnull), r"/dev/null: is not a regular file \(a character device\)")
    both_raise(tmp_path / "nothing.jsonl", r"nothing.jsonl: no such file$")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "gone.jsonl")
    both_raise(tmp_path / "link.jsonl", r"no such file \(a symbolic link to a missing file\)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_opening_it(tmp_path, capsys):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    # Were the FIFO opened for reading, this writer would let it go on (to "no records")
    # instead of blocking the test for ever.
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    try:
        both_raise(fifo, r"train.jsonl: is not a regular file \(a FIFO\)")
        code = main(["prepare", str(fifo), "--tokenizer", "unused", "--seq-length", "8"])
        assert code == 2
        assert "is not a regular file (a FIFO)" in capsys.readouterr().err
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # releases the writer
        writer.join(5)
        os.close(reader)


def test_prepare_names_a_directory(tmp_path, capsys):
    assert main(["prepare", str(tmp_path), "--tokenizer", "unused", "--seq-length", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory, not a data file" in err


# ----------------------------------------------------------------------------- not JSON Lines


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("empty.jsonl", b"", r"empty.jsonl: no records"),
        ("blank.jsonl", b"\n \n", r"blank.jsonl: no records"),
        ("bin.jsonl", bytes(range(256)) * 4, r"bin.jsonl:1: "),
        ("nul.jsonl", b"\0" * 64, r"nul.jsonl:1: invalid JSON"),
        ("text.jsonl", b"hello world\n", r"text.jsonl:1: invalid JSON"),
        ("fake.jsonl.gz", b"not gzip at all\n", r"fake.jsonl.gz:1: corrupt or truncated gzip"),
        ("cut.jsonl.gz", gzip.compress(LONG_LINE)[:60], r"cut.jsonl.gz:\d+: corr"),
        ("zipped.jsonl", gzip.compress(b"{}\n"), r"zipped.jsonl:1: .*must be named \.gz"),
        ("zipped.json", gzip.compress(b"[]"), r"zipped.json: .*must be named \.gz"),
    ],
    ids=lambda value: value if isinstance(value, str) and "." in value[1:] else "",
)
def test_files_that_are_not_json_lines_are_one_line(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    both_raise(path, match)


# ----------------------------------------------------------------------------- record size


def test_record_over_the_size_limit_is_refused_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1024)
    at_limit = json.dumps({"prompt": "x" * (1024 - 31), "response": "r"})
    assert len(at_limit) == 1024
    path = tmp_path / "big.jsonl"
    big = json.dumps({"prompt": "x" * 3000, "response": "r"})
    path.write_text(f"{at_limit}\r\n{at_limit}\n{big}\n")
    first_two = itertools.islice(formats.iter_records(path), 2)  # at the limit: read
    assert [len(r.prompt) for r in first_two] == [1024 - 31] * 2
    with pytest.raises(
        DataError,
        match=r"big.jsonl:3: this record is 3,031 bytes of JSON, over the limit of 1,024 bytes",
    ):
        read_records(path)
    # A line with no end is not read whole: the size is counted up to 64 times the limit.
    endless = tmp_path / "endless.jsonl"
    endless.write_bytes(b"x" * (70 * 1024))
    both_raise(endless, r"endless.jsonl:1: this record is at least 71,680 bytes of JSON")
    # A .json list: each item as it would be one JSON Lines line.
    listed = tmp_path / "big.json"
    listed.write_text(json.dumps([json.loads(at_limit), json.loads(big)]))
    with pytest.raises(DataError, match=r"big.json:2: this record is 3,028 bytes of JSON"):
        read_records(listed)


def test_a_lone_surrogate_escape_is_one_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "\\ud83d\\ude00", "response": "r"}\n{"prompt": "a\\uDC00b"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: \\udc00 is half of a UTF-16 surrogate pair"):
        read_records(path)
    listed = tmp_path / "a.json"
    listed.write_text('[{"prompt": "\\ud800", "response": "r"}]')
    both_raise(listed, r"a.json:1: \\ud800 is half of a UTF-16 surrogate pair")


def test_a_long_first_record_is_encoded_once_and_the_same(monkeypatch):
    """The first batch's check of the fast path compares only the start of each text: a
    megabyte-long first record was encoded three times (80% of its time and memory)."""
    from sftune.data import tokenize

    seen: list[int] = []
    agrees = tokenize.DocumentEncoder._backend_agrees

    def spy(self, sample):
        seen.extend(map(len, sample))
        return agrees(self, sample)

    monkeypatch.setattr(tokenize.DocumentEncoder, "_backend_agrees", spy)
    tok = byte_tokenizer()
    texts = ["é" * 20_000 + " long", "short"]
    tokens, lengths, _ = tokenize.DocumentEncoder(tok).encode(texts, [None, None])
    assert max(seen) == tokenize.AGREE_CHARS
    expected = [i for t in texts for i in [*tok(t)["input_ids"], tok.eos_token_id]]
    assert tokens.tolist() == expected and lengths.tolist() == [40_007, 7]


# ----------------------------------------------------------------------------- chat templates

NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{{ messages[0]['content'] }}"
)
WRITING_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
REPEATING = "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}"


def chat_stream(tmp_path: Path, template: str):
    from sftune.data.tokenize import build_stream

    tok = byte_tokenizer()
    tok.chat_template = template
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n")
    return build_stream(tok, path, train_on="all")


@pytest.mark.parametrize("template", [NESTED_LOOPS, WRITING_LOOPS], ids=["counting", "writing"])
def test_a_template_that_never_ends_stops_at_the_time_limit(tmp_path, monkeypatch, template):
    monkeypatch.setattr(limits, "RENDER_SECONDS", 0.2)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"chats.jsonl:1: the chat template of .* fails: render"):
        chat_stream(tmp_path, template)
    assert time.monotonic() - start < 10  # unbounded, it runs for hours


def test_the_time_limit_is_per_record_not_per_render(tmp_path, monkeypatch):
    """Each prefix of a long chat is one quick render; a record of 2,000 messages makes about
    2,000 of them (some 15 s on one core, unbounded): they all share one record's time."""
    from sftune.data.tokenize import build_stream

    monkeypatch.setattr(limits, "RENDER_SECONDS", 0.2)  # each render: a few ms
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": CHAT["messages"] * 1000}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:1: .*fails: rendering took over 0.2 s"):
        build_stream(tok, path, train_on="assistant")


def test_a_template_that_writes_too_much_stops_at_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "RENDER_MAX_CHARS", 10_000)
    with pytest.raises(DataError, match=r"chats.jsonl:1: .*wrote over 10,000 characters"):
        chat_stream(tmp_path, REPEATING)


def test_bounded_range_renders_as_jinja_range():
    from transformers.utils.chat_template_utils import _compile_jinja_template

    source = (
        "{{ range(5)|length }} {{ range(5)|list }} {{ range(1, 9, 3)|reverse|list }} "
        "{{ range(5)[1:3]|list }} {{ range(5)[-1] }} {{ 3 in range(5) }} {{ range(4)|last }} "
        "{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}"
    )
    template = _compile_jinja_template(source)
    assert limits.bounded(template)() == template.render()
    with pytest.raises(OverflowError):  # the sandbox's own limit still holds
        limits.bounded(template.environment.from_string("{{ range(10**6)|length }}"))()


# ----------------------------------------------------------------------------- task YAMLs


@pytest.mark.parametrize("mutual", [False, True], ids=["itself", "each-other"])
def test_a_task_yaml_that_includes_itself_is_one_line(tmp_path, mutual):
    from sftune import tasks

    if mutual:
        (tmp_path / "a.yaml").write_text("include: b.yaml\ntask: loop\n")
        (tmp_path / "b.yaml").write_text("include: ./a.yaml\n")
        cycle = "a.yaml -> b.yaml -> a.yaml"
    else:
        (tmp_path / "a.yaml").write_text("include: a.yaml\ntask: loop\n")
        cycle = "a.yaml -> a.yaml"
    assert "loop" in tasks.known_tasks(str(tmp_path))  # named by its own `task:`
    with pytest.raises(ConfigError, match=f"a.yaml: include: cycle {cycle}"):
        tasks.resolve_tasks("loop", None, str(tmp_path))


def test_task_include_chain_is_bounded_and_a_link_is_the_same_file(tmp_path):
    from sftune import tasks

    for i in range(40):
        (tmp_path / f"t{i}.yaml").write_text(f"include: t{i + 1}.yaml\n")
    with pytest.raises(ConfigError, match="more than 32 files deep"):
        tasks.read_task_yaml(tmp_path / "t0.yaml")
    (tmp_path / "real.yaml").write_text("include: alias.yaml\ntask: x\n")
    (tmp_path / "alias.yaml").symlink_to(tmp_path / "real.yaml")
    with pytest.raises(ConfigError, match="cycle real.yaml -> alias.yaml"):
        tasks.read_task_yaml(tmp_path / "real.yaml")


def test_task_data_that_is_a_directory_or_deep_json_is_one_line(tmp_path):
    from sftune import tasks

    with pytest.raises(DataError, match=r"is a directory, not a data file.*\(--task-data gsm8k\)"):
        tasks.resolve_tasks("gsm8k", f"gsm8k={tmp_path}")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"question": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:1: JSON nested too deeply"):
        tasks.resolve_tasks("gsm8k", f"gsm8k={deep}")
