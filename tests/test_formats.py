"""Reading records: shapes, field mappings, compression, every kind of bad input, and peek."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from sftune.data.formats import (
    ALPACA,
    MESSAGES,
    PROMPT_RESPONSE,
    SHAREGPT,
    Record,
    peek,
    read_records,
)
from sftune.errors import DataError


def write_jsonl(path: Path, rows: list, compress: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


def test_prompt_response_plain_and_gzip(tmp_path):
    rows = [{"prompt": "p1", "response": "r1", "extra": 3}, {"prompt": "p2", "response": "r2"}]
    for compress, name in [(False, "a.jsonl"), (True, "a.jsonl.gz")]:
        records = read_records(write_jsonl(tmp_path / name, rows, compress))
        assert records == [Record("p1", "r1", None, 1), Record("p2", "r2", None, 2)]


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n{"prompt": "p", "response": "r"}\n  \n\n{"prompt": "q", "response": "s"}\n')
    assert [(r.prompt, r.line) for r in read_records(path)] == [("p", 2), ("q", 5)]


def test_json_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}]))
    assert read_records(path) == [Record("p", "r", None, 1)]


def test_alpaca_prompt_joins_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2+2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say yo.", "output": "yo"},
    ]
    records = read_records(write_jsonl(tmp_path / "a.jsonl", rows))
    assert [(r.prompt, r.response) for r in records] == [
        ("Add.\n\n2+2", "4"),
        ("Say hi.", "hi"),
        ("Say yo.", "yo"),
    ]


def test_field_mapping_on_gsm8k(shared):
    path = shared / "data/gsm8k/test.jsonl"
    records = read_records(path, fields={"prompt": "question", "response": "answer"})
    assert len(records) == 1319
    first = json.loads(path.read_text().splitlines()[0])
    assert records[0].prompt == first["question"]
    assert records[0].response == first["answer"]


def test_messages(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (record,) = read_records(write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}]))
    assert record.messages == tuple(chat)


def test_messages_field_mapping(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "a.jsonl", [{"conv": chat}])
    (record,) = read_records(path, fields={"messages": "conv"})
    assert record.messages == tuple(chat)


# --- bad input: DataError, one line, naming the file and (where there is one) the line ---


def assert_data_error(path: Path, match: str, line: int | None = None, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        read_records(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path) if line is None else f"{path}:{line}:")
    return info.value


def test_missing_file(tmp_path):
    assert_data_error(tmp_path / "nope.jsonl", "no such file")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert_data_error(path, "no records")


def test_invalid_json(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": \n')
    assert_data_error(path, "invalid JSON", line=2)


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "p"}, "response", "missing"),
        ({"response": "r"}, "prompt", "missing"),
        ({"prompt": 3, "response": "r"}, "prompt", "must be a string, not int"),
        ({"prompt": "p", "response": None}, "response", "must be a string, not null"),
    ],
)
def test_missing_or_non_string_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "ok", "response": "ok"}, row])
    error = assert_data_error(path, problem, line=2)
    assert error.field == field and f"field {field!r}" in str(error)


def test_missing_mapped_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q"}])
    error = assert_data_error(
        path, "missing", line=1, fields={"prompt": "question", "response": "answer"}
    )
    assert error.field == "answer"


def test_unknown_shape(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    assert_data_error(path, "cannot tell the record format", line=1)


def test_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}, [1, 2]])
    assert_data_error(path, "JSON object", line=2)


def test_bad_messages(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "user", "content": "bye"}]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}])
    assert_data_error(path, "two user turns in a row", line=1)
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}]}])
    assert_data_error(path, "needs a string 'content'", line=1)


def test_not_utf8_reports_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff\xfe", "response": "r"}\n')
    assert_data_error(path, "not valid UTF-8", line=2)


def test_truncated_gzip(tmp_path):
    rows = [{"prompt": f"p{i}" * 50, "response": "r" * 100} for i in range(200)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated gzip") as info:
        read_records(path)
    # Reading stops inside the stream: the error names the line it could not finish.
    assert info.value.line is not None and info.value.line > 1
    assert str(info.value).startswith(f"{path}:{info.value.line}:")


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n')
    assert_data_error(path, "gzip", line=1)


# --- peek: the first record only, validated exactly as read_records would ------------------


def same_error(path: Path, line: int | None, **kwargs) -> str:
    """peek's DataError for `path` is read_records' (message, line and field), one line."""
    with pytest.raises(DataError) as full:
        read_records(path, **kwargs)
    with pytest.raises(DataError) as first:
        peek(path, **kwargs)
    assert str(first.value) == str(full.value) and "\n" not in str(first.value)
    assert (first.value.line, first.value.field) == (full.value.line, full.value.field)
    assert first.value.line == line
    return str(first.value)


@pytest.mark.parametrize(
    "rows, fields, shape",
    [
        ([{"prompt": "p", "response": "r"}], None, PROMPT_RESPONSE),
        ([{"instruction": "i", "input": "", "output": "o"}], None, ALPACA),
        ([{"messages": [{"role": "user", "content": "hi"}]}], None, MESSAGES),
        ([{"question": "q", "answer": "a"}], {"prompt": "question", "response": "answer"}, None),
    ],
)
def test_peek_names_the_format(tmp_path, rows, fields, shape):
    for compress, name in [(False, "a.jsonl"), (True, "a.jsonl.gz")]:
        path = write_jsonl(tmp_path / name, rows, compress)
        assert peek(path, fields) == (shape or PROMPT_RESPONSE)
    json_list = tmp_path / "a.json"
    json_list.write_text(json.dumps(rows))
    assert peek(json_list, fields=fields) == (shape or PROMPT_RESPONSE)


def test_peek_reads_only_the_first_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n{"prompt": "p", "response": "r"}\nnot json at all\n{"prompt": 3}\n')
    assert peek(path) == PROMPT_RESPONSE
    with pytest.raises(DataError, match="invalid JSON"):
        read_records(path)


def test_peek_missing_and_empty_file(tmp_path):
    assert same_error(tmp_path / "nope.jsonl", None).endswith("nope.jsonl: no such file")
    empty = tmp_path / "empty.jsonl"
    for content in [b"", b"\n \n"]:
        empty.write_bytes(content)
        assert "no records" in same_error(empty, None)


@pytest.mark.parametrize("name", ["data.csv", "data.jsonl"])
def test_peek_csv_is_invalid_json_on_line_1(tmp_path, name):
    path = tmp_path / name
    path.write_text("question,answer\nWhat is 2+2?,4\n")
    message = same_error(path, 1)
    assert message.startswith(f"{path}:1: invalid JSON")


def test_peek_unmapped_keys_cannot_tell_format(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert "cannot tell the record format" in same_error(path, 1)


@pytest.mark.parametrize(
    "row, fields, problem",
    [
        ({"prompt": "p"}, None, "field 'response': missing"),
        ({"prompt": 3, "response": "r"}, None, "field 'prompt': must be a string, not int"),
        ({"question": "q"}, {"prompt": "question", "response": "answer"}, "'answer': missing"),
        ([1, 2], None, "JSON object"),
        ({"messages": [{"role": "user", "content": " "}]}, None, "message 0: empty content"),
        ({"messages": [{"role": "user"}]}, None, "needs a string 'content'"),
    ],
)
def test_peek_bad_first_record(tmp_path, row, fields, problem):
    path = write_jsonl(tmp_path / "a.jsonl", [row, {"prompt": "ok", "response": "ok"}])
    assert problem in same_error(path, 1, fields=fields)


def test_peek_bad_bytes(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "\xff", "response": "r"}\n')
    assert "not valid UTF-8" in same_error(path, 1)
    not_gzip = tmp_path / "b.jsonl.gz"
    not_gzip.write_bytes(b'{"prompt": "p", "response": "r"}\n')
    assert "gzip" in same_error(not_gzip, 1)
    bad_fields = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r"}])
    assert "unknown target field" in same_error(bad_fields, None, fields={"answer": "x"})


# --- chats: ShareGPT, tools, per-turn flags, order (chat.py) --------------------------------


def test_sharegpt_roles_tools_and_flags_normalised(tmp_path):
    tools = [{"type": "function", "function": {"name": "add"}}]
    conversation = [
        {"from": "system", "value": "Be brief."},
        {
            "from": "human",
            "value": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}],
        },
        {"from": "function_call", "value": '{"name": "add", "arguments": "{\\"a\\": 2}"}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "4", "weight": 0},
    ]
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"conversations": conversation, "tools": json.dumps(tools)}]
    )
    assert peek(path) == SHAREGPT
    (record,) = read_records(path)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    assert record.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4"},
    )
    assert record.tools == tuple(tools) and record.train == (None, None, None, None, False)


def test_openai_tool_calls_null_and_the_older_function_call(tmp_path):
    chat = [
        {"role": "user", "content": "2+2?", "tool_calls": None},
        {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": "{}"}},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
        {"role": "assistant", "content": "4", "tool_calls": [], "train": True},
    ]
    (record,) = read_records(write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}]))
    assert record.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {}}
    assert record.messages[2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    assert record.messages[3] == {"role": "assistant", "content": "4"}
    assert record.train == (None, None, None, True)


def test_system_prompt_added_where_there_is_none(tmp_path):
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"}],
    ]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in chats])
    first, second = read_records(path, system_prompt="Default.")
    assert first.messages[0] == {"role": "system", "content": "Default."} and first.train == (
        None,
        None,
    )
    assert second.messages[0]["content"] == "Own." and len(second.messages) == 2


U, A = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "chat, problem",
    [
        ([A, U], "message 0: the conversation must open with a user turn, not assistant"),
        ([U, {"role": "system", "content": "s"}], "message 1: a system message must come first"),
        ([U, A, A], "two assistant turns in a row (messages 1 and 2)"),
        ([U, {"role": "tool", "content": "4"}], "a tool result must follow an assistant tool call"),
        ([U, {**A, "train": "no"}], "'train' must be true or false"),
        ([U, {**A, "weight": 0.5}], "'weight' must be 0 or 1"),
        ([U, {**A, "tool_calls": [{"function": {}}]}], "needs a 'function' with a string 'name'"),
        ([U, {"from": "function_call", "value": "add(2)"}], "function_call value must be JSON"),
        ([U, "hi"], "message 1: must be an object"),
        ([{"content": "x"}], "needs a string 'role'"),
    ],
)
def test_bad_chats(tmp_path, chat, problem):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [U, A]}, {"messages": chat}])
    error = assert_data_error(path, re.escape(problem), line=2)
    assert error.field == "messages"


def test_mixed_formats_name_the_line(tmp_path):
    rows = [
        {"prompt": "p", "response": "r"},
        {"prompt": "q", "response": "s"},
        {"instruction": "i", "output": "o"},
    ]
    error = str(assert_data_error(write_jsonl(tmp_path / "a.jsonl", rows), "one format", line=3))
    assert "this record is Alpaca, but the file's first record (line 1) is prompt/response" in error
    path = write_jsonl(
        tmp_path / "b.jsonl",
        [{"question": "q", "answer": "a"}, {"instruction": "i", "output": "o"}],
    )
    with pytest.raises(DataError, match="field 'question': missing"):  # a mapping decides: no check
        read_records(path, fields={"prompt": "question", "response": "answer"})
