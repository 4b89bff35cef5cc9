"""Read one chat record into OpenAI-style messages: roles, tool calls, per-turn training flags.

Two shapes are read without any mapping, message by message (a file may use either key with
either message style):

    {"messages": [{"role": "user", "content": "2+2?"},                 OpenAI
                  {"role": "assistant", "content": "4"}]}
    {"conversations": [{"from": "human", "value": "2+2?"},             ShareGPT
                       {"from": "gpt", "value": "4"}]}

Roles: system, user, assistant and tool; ShareGPT's human -> user, gpt -> assistant,
observation -> tool, and function_call -> an assistant message whose `tool_calls` hold the
call (its value is the JSON `{"name": ..., "arguments": ...}`, or a list of them). OpenAI
`tool_calls` (and the older `function_call`) pass through, their `arguments` parsed from a
JSON string into an object (what chat templates expect). A record-level `tools` list (or, as LLaMA-Factory writes it, a string
holding one) is kept for the template.

A message may opt out of training with `"train": false` or `"weight": 0` (Axolotl's keys);
`"train": true` / `"weight": 1` trains a turn that the `--train-on` mode would not.

    >>> parse_chat(Path("a.jsonl"), [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo",
    ...            "weight": 0}], None, line=1, key="conversations")
    Chat(messages=({'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}), tools=None, train=(None, False))

Problems raise `DataError` naming the file, line and field: an unknown role, an empty content,
roles out of order (a conversation that does not open with a user turn, after an optional
system message; two user or two assistant turns in a row; a system message after the first; a
tool result that answers no tool call), a `tools` entry that is not a list.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from sftune.errors import DataError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
FUNCTION_CALL = "function_call"  # ShareGPT's tool call: an assistant turn
ROLES = {
    SYSTEM: SYSTEM,
    USER: USER,
    ASSISTANT: ASSISTANT,
    TOOL: TOOL,
    "human": USER,
    "gpt": ASSISTANT,
    "observation": TOOL,
    FUNCTION_CALL: ASSISTANT,
}
_KNOWN_ROLES = "system, user, assistant, tool (ShareGPT: human, gpt, function_call, observation)"
_PASSED_THROUGH = ("tool_call_id", "name")  # optional string keys a template may read


class Chat(NamedTuple):
    """A conversation as the chat template reads it, with the per-message training flags."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None
    train: tuple[bool | None, ...]  # None: as --train-on decides


def parse_chat(path: Path, messages: Any, tools: Any, *, line: int, key: str) -> Chat:
    """Validate and normalise one record's messages and tools (see the module doc)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, "must be a non-empty list of messages", line=line, field=key)
    out: list[dict[str, Any]] = []
    flags: list[bool | None] = []
    for i, m in enumerate(messages):
        message, flag = _message(path, m, line, key, i)
        out.append(message)
        flags.append(flag)
    _check_order(path, out, line, key)
    return Chat(tuple(out), _tools(path, tools, line), tuple(flags))


def with_system_prompt(chat: Chat, system_prompt: str | None) -> Chat:
    """`chat` with a first system message of `system_prompt`, unless it has one already."""
    if not system_prompt or chat.messages[0]["role"] == SYSTEM:
        return chat
    system = {"role": SYSTEM, "content": system_prompt}
    return Chat((system, *chat.messages), chat.tools, (None, *chat.train))


def _message(path: Path, m: Any, line: int, key: str, i: int) -> tuple[dict, bool | None]:
    def fail(problem: str) -> DataError:
        return DataError(path, f"message {i}: {problem}", line=line, field=key)

    if not isinstance(m, dict):
        raise fail(f"must be an object, not {type(m).__name__}")
    name = m.get("role", m.get("from"))
    if not isinstance(name, str):
        raise fail("needs a string 'role' (or ShareGPT's 'from')")
    role = ROLES.get(name)
    if role is None:
        raise fail(f"unknown role {name!r} (expected {_KNOWN_ROLES})")
    message: dict[str, Any] = {"role": role}
    content = m.get("content", m.get("value"))
    if name == FUNCTION_CALL:
        message["content"] = ""
        message["tool_calls"] = _function_call(content, fail)
    else:
        if role == ASSISTANT and m.get("tool_calls"):  # null or [] (API exports): no calls
            message["tool_calls"] = _tool_calls(m["tool_calls"], fail)
        elif role == ASSISTANT and m.get("function_call"):  # OpenAI's older single call
            message["tool_calls"] = _function_call(m["function_call"], fail)
        message["content"] = _content(content, "tool_calls" in message, fail)
    for extra in _PASSED_THROUGH:
        if isinstance(m.get(extra), str):
            message[extra] = m[extra]
    return message, _flag(m, fail)


def _content(value: Any, has_tool_calls: bool, fail) -> str:
    """A string; a list of text parts is joined; empty only beside tool calls."""
    if value is None and has_tool_calls:
        return ""
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise fail("needs a string 'content' (or ShareGPT's 'value')")
    if not value.strip() and not has_tool_calls:
        raise fail("empty content")
    return value


def _tool_calls(value: Any, fail) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise fail("'tool_calls' must be a non-empty list")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise fail("each tool call needs a 'function' with a string 'name'")
        function = {**function, "arguments": _arguments(function.get("arguments", {}))}
        calls.append({**call, "type": call.get("type", "function"), "function": function})
    return calls


def _function_call(value: Any, fail) -> list[dict[str, Any]]:
    """ShareGPT's function_call value, `{"name": ..., "arguments": ...}` as JSON (or a list)."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        parsed = None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise fail('a function_call value must be JSON {"name": ..., "arguments": ...}')
    return _tool_calls([{"type": "function", "function": c} for c in calls], fail)


def _arguments(value: Any) -> Any:
    """Arguments as an object: templates write them with `tojson`, which would quote a string."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _flag(m: dict, fail) -> bool | None:
    if "train" in m:
        if not isinstance(m["train"], bool):
            raise fail(f"'train' must be true or false, not {m['train']!r}")
        return m["train"]
    if "weight" in m:
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            raise fail(f"'weight' must be 0 or 1, not {m['weight']!r}")
        return m["weight"] == 1
    return None


def _check_order(path: Path, messages: list[dict], line: int, key: str) -> None:
    """Roles in an order every template accepts: see the module doc."""
    previous: dict | None = None
    for i, m in enumerate(messages):
        role = m["role"]
        problem = None
        if role == SYSTEM and i > 0:
            problem = "a system message must come first"
        elif role in (ASSISTANT, TOOL) and (previous is None or previous["role"] == SYSTEM):
            problem = f"the conversation must open with a user turn, not {role}"
        elif previous is not None and role == previous["role"] and role in (USER, ASSISTANT):
            problem = f"two {role} turns in a row (messages {i - 1} and {i}): roles must alternate"
        elif role == TOOL and not (
            previous is not None and (previous["role"] == TOOL or "tool_calls" in previous)
        ):
            problem = "a tool result must follow an assistant tool call or another tool result"
        elif role == USER and previous is not None and previous["role"] == TOOL:
            problem = "after tool results the assistant speaks next, not the user"
        if problem:
            where = problem if "messages" in problem else f"message {i}: {problem}"
            raise DataError(path, where, line=line, field=key)
        previous = m


def _tools(path: Path, value: Any, line: int) -> tuple[dict[str, Any], ...] | None:
    """The record's tool definitions: a list of objects, or a string holding one as JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise DataError(
            path,
            f"must be a list of tool definitions (objects), not {kind}",
            line=line,
            field="tools",
        )
    return tuple(value) or None
