"""`sftune generate`: a prompt, a system prompt, a conversation from a --messages file (tools
included), an interactive chat on a terminal; bad input is one line. The prompts reach the
model rendered the way the model was tuned (the ids handed to `generate` are checked)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sftune.cli import main
from sftune.train import generate as gen_mod
from tiny import chat_model_dir

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny chat model (ChatML) that sftune tuned on chats with a system prompt."""
    path = chat_model_dir(tmp_path_factory.mktemp("chat") / "final")
    meta = {"prompt_format": "chat", "seq_length": 32, "system_prompt": "You add numbers."}
    (path / "sftune.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def prompts(monkeypatch) -> list[str]:
    """The text of every prompt handed to the model (which answers "four")."""
    seen: list[str] = []

    def fake(module, tokenizer, ids, **kw):
        seen.append(tokenizer.decode(ids))
        return "four"

    monkeypatch.setattr(gen_mod, "generate", fake)
    return seen


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _chat(system: str | None, *turns: str) -> str:
    """ChatML, as tests/tiny.py's CHATML renders it, ready for the assistant."""
    roles = ["user", "assistant"] * ((len(turns) + 1) // 2)
    head = [("system", system)] if system else []
    body = "".join(
        f"<|im_start|>{r}\n{c}<|im_end|>\n"
        for r, c in [*head, *zip(roles[: len(turns)], turns, strict=True)]
    )
    return body + "<|im_start|>assistant\n"


def test_prompt_and_system_prompt(chat_model, prompts, capsys):
    code, out, err = _main(["generate", "--model", str(chat_model), "--prompt", "2+2?"], capsys)
    assert code == 0, err
    assert out == "four\n"
    assert prompts[-1] == _chat("You add numbers.", "2+2?")  # the tuned system prompt
    args = ["generate", "--model", str(chat_model), "--prompt", "2+2?", "--system-prompt", "Hi."]
    assert _main(args, capsys)[0] == 0
    assert prompts[-1] == _chat("Hi.", "2+2?")


def test_messages_file_with_tools(chat_model, prompts, tmp_path, capsys):
    convo = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(convo))
    code, out, err = _main(
        ["generate", "--model", str(chat_model), "--messages", str(plain)], capsys
    )
    assert code == 0 and out == "four\n", err
    assert prompts[-1] == _chat("You add numbers.", "What is 2+2?", "4", "And 3+3?")
    with_tools = tmp_path / "tools.json"
    with_tools.write_text(json.dumps({"messages": convo, "tools": TOOLS}))
    args = ["generate", "--model", str(chat_model), "--messages", str(with_tools)]
    assert _main([*args, "--system-prompt", "Be brief."], capsys)[0] == 0
    tools = "<|im_start|>tools\n" + json.dumps(TOOLS) + "<|im_end|>\n"
    assert prompts[-1] == tools + _chat("Be brief.", "What is 2+2?", "4", "And 3+3?")
    # The file's own system message is used as it is; with --system-prompt too: which one?
    own = tmp_path / "own.json"
    own.write_text(json.dumps([{"role": "system", "content": "Mine."}, *convo]))
    args = ["generate", "--model", str(chat_model), "--messages", str(own)]
    assert _main(args, capsys)[0] == 0
    assert prompts[-1] == _chat("Mine.", "What is 2+2?", "4", "And 3+3?")
    code, _, err = _main([*args, "--system-prompt", "Be brief."], capsys)
    assert code == 2 and "own.json's own system message: give one of them" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2", "bad.json:1: not valid JSON"),
        ('"hello"', 'expected a list of messages or {"messages"'),
        ('{"messages": [], "extra": 1}', "field 'extra': unknown key"),
        ("[]", "field 'messages': must be a non-empty list of messages"),
        ('[{"role": "robot", "content": "x"}]', "message 0: unknown role 'robot'"),
        ('[{"role": "user"}]', "message 0: needs a string 'content'"),
        (
            '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]',
            "field 'messages': ends with an assistant turn: end it with the user turn",
        ),
        ('{"messages": [{"role": "user", "content": "a"}], "tools": 3}', "field 'tools'"),
    ],
)
def test_bad_messages_file_is_one_line(workdir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, _, err = _main(
        ["generate", "--model", str(workdir / "model"), "--messages", str(bad)], capsys
    )
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--prompt", "x", "--system-prompt", "s"], "Alpaca prompts, which have no system"),
        (["--messages", "nowhere.json"], "nowhere.json: no such file (--messages)"),
        ([], "give --prompt or --messages FILE (the interactive chat needs a terminal)"),
        (["--prompt", "x", "--messages", "m.json"], "not allowed with argument --prompt"),
    ],
)
def test_bad_generate_flags_are_one_line(workdir, capsys, monkeypatch, args, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    code, _, err = _main(["generate", "--model", str(workdir / "model"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("sftune: error: ") and "error: sftune:" not in err


def test_parser_errors_have_one_prefix(capsys):
    code, _, err = _main(["generate", "--model", "m", "--bogus"], capsys)
    assert (code, err) == (2, "sftune: error: unrecognized arguments: --bogus\n")
    code, _, err = _main(["eval", "--model", "m"], capsys)
    assert code == 2 and err.startswith("sftune: error: eval: one of the arguments --data"), err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_chat_keeps_the_history(chat_model, prompts, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Terminal("What is 2+2?\n\nAnd 3+3?\n/exit\nunread\n"))
    code, out, err = _main(["generate", "--model", str(chat_model)], capsys)
    assert code == 0, err
    assert prompts == [
        _chat("You add numbers.", "What is 2+2?"),
        _chat("You add numbers.", "What is 2+2?", "four", "And 3+3?"),
    ]
    assert out.count("four\n") == 2 and "/exit or /quit or Ctrl-D" in out
    # End of input (Ctrl-D) quits too, after answering what came before it.
    monkeypatch.setattr("sys.stdin", _Terminal("Hello"))
    assert _main(["generate", "--model", str(chat_model)], capsys)[0] == 0
    assert prompts[-1] == _chat("You add numbers.", "Hello")


def test_alpaca_chat_answers_each_prompt_on_its_own(workdir, prompts):
    from sftune.data.templates import render_alpaca

    gen = gen_mod.load_generator(str(workdir / "model"), max_new_tokens=4)
    lines = iter(["Add 1 and 2.", "Add 3 and 4."])

    def read(_prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    shown: list[str] = []
    assert gen_mod.chat_loop(gen, read=read, write=shown.append) == 2
    assert [p.removeprefix("<|begin_of_text|>") for p in prompts] == [
        render_alpaca("Add 1 and 2.", "")[0],
        render_alpaca("Add 3 and 4.", "")[0],
    ]
    assert "alpaca format; each prompt on its own" in shown[0]


def test_training_samples_tell_two_chats_apart(tmp_path, capsys):
    """Two validation chats that end with the same user turn: the console shows their system
    prompts and lengths, samples.jsonl keeps each whole conversation, tools and answer."""
    from sftune.train.loop import train
    from trainutil import tiny_config

    model = chat_model_dir(tmp_path / "model")
    last = "Can you just repeat the final number?"
    chats = [
        {
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "What is 10 + 20?"},
                {"role": "assistant", "content": "Arr, 30."},
                {"role": "user", "content": last},
                {"role": "assistant", "content": "30"},
            ],
            "tools": TOOLS,
        },
        {"messages": [{"role": "user", "content": last}, {"role": "assistant", "content": "7"}]},
    ]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = tiny_config(
        tmp_path,
        tmp_path / "run",
        model=str(model),
        train_data=str(val),
        val_data=str(val),
        batch_size=2,
        max_steps=1,
        num_samples=2,
        max_new_tokens=2,
    )
    capsys.readouterr()
    run = train(cfg).output_dir
    lines = [line for line in capsys.readouterr().out.splitlines() if "sample |" in line]
    assert any(
        f"system 'You are a pirate.' | 4 messages | tools add | user {last!r}" in s for s in lines
    )
    assert any(f"sample | 1 message | user {last!r} ->" in s for s in lines)
    rows = [json.loads(line) for line in (run / "samples.jsonl").open()]
    assert len(rows) == 4  # two samples at step 0 and at the end
    pirate = next(r for r in rows if r.get("tools"))
    assert pirate["messages"] == chats[0]["messages"][:4] and pirate["tools"] == TOOLS
    assert pirate["reference"]["content"] == "30"
    short = next(r for r in rows if not r.get("tools"))
    assert short["messages"] == chats[1]["messages"][:1]
