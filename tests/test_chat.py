"""Chat data (issue 14): every assistant turn trained with any template, the formats people have.

Real templates on real tokenizers: SmolLM2-Instruct's ChatML (its own), Gemma 3 IT's on the
Gemma 3 tokenizer, Llama 3 and 3.1 Instruct's on the Llama 3 tokenizer (tests/chat_templates.py).
A trained "run" is a stretch of consecutive trained tokens, decoded.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from chat_templates import DROPS_EARLIER_THOUGHTS, GEMMA3_IT, LLAMA3_INSTRUCT, LLAMA31_INSTRUCT
from sftune import config
from sftune.cli import main
from sftune.data import IGNORE_INDEX, PackedSFTDataset
from sftune.data.chat_templates import CHATML, NAMED_TEMPLATES
from sftune.data.show import show_documents
from sftune.data.templates import adds_bos
from sftune.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "You answer in one line."}
TURNS = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]
CONVERSATION = [SYSTEM, *TURNS]
ANSWERS = [m["content"] for m in TURNS if m["role"] == "assistant"]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": CALL}]},
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny."},
]
TOOL_SHAREGPT = [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps(CALL)},
    {"from": "observation", "value": "18 C, sunny"},
    {"from": "gpt", "value": "It is 18 C and sunny."},
]


@contextlib.contextmanager
def template(tok, chat_template: str, name: str | None = None):
    """`tok` with another chat template (and name) for a while: cheaper than a copy."""
    saved = tok.chat_template, tok.name_or_path
    tok.chat_template = chat_template
    tok.name_or_path = name or tok.name_or_path
    try:
        yield tok
    finally:
        tok.chat_template, tok.name_or_path = saved


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer):
    """Llama 3 Instruct: its template and its EOS, <|eot_id|>, which also ends each turn."""
    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = LLAMA3_INSTRUCT
    tok.eos_token = "<|eot_id|>"
    return tok


@pytest.fixture
def llama31(llama3):
    """Llama 3.1 Instruct: tools in the first user turn, JSON tool calls."""
    with template(llama3, LLAMA31_INSTRUCT):
        yield llama3


@pytest.fixture(scope="module")
def gemma3(gemma3_tokenizer):
    """Gemma 3 IT: turns end with <end_of_turn>, the EOS is <eos> (appended)."""
    with template(gemma3_tokenizer, GEMMA3_IT):
        yield gemma3_tokenizer


@pytest.fixture
def chatml(smollm2_tokenizer):
    """SmolLM2 with sftune's shipped `--chat-template chatml` (tools and tool calls)."""
    with template(smollm2_tokenizer, CHATML):
        smollm2_tokenizer.sftune_chat_template = "chatml"
        yield smollm2_tokenizer
        del smollm2_tokenizer.sftune_chat_template


# name -> (tokenizer fixture, end-of-turn token); Gemma's tokenizer takes 5 s to read: slow.
TEMPLATES = {
    "smollm2-chatml": ("smollm2_tokenizer", "<|im_end|>"),
    "shipped-chatml": ("chatml", "<|im_end|>"),
    "shipped-llama3": ("llama31", "<|eot_id|>"),
    "llama3": ("llama3", "<|eot_id|>"),
    "gemma3": ("gemma3", "<end_of_turn>"),
}
PARAMS = [
    pytest.param(name, marks=[pytest.mark.slow] if name == "gemma3" else []) for name in TEMPLATES
]


@pytest.fixture
def chat_tokenizer(request):
    fixture, end_of_turn = TEMPLATES[request.param]
    return request.getfixturevalue(fixture), end_of_turn


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pack(tok, path: Path, seq_length: int = 8, **kwargs) -> PackedSFTDataset:
    kwargs.setdefault("use_cache", "cache_dir" in kwargs)  # no tokenizer fingerprint to pay
    return PackedSFTDataset(tok, path, seq_length, False, verbose=False, **kwargs)


def document(ds: PackedSFTDataset, j: int = 0) -> tuple[list[int], list[bool]]:
    """Tokens and trained flags of document j."""
    ends = [*ds.doc_starts.tolist(), len(ds.tokens)]
    tokens = ds.tokens[ends[j] : ends[j + 1]].tolist()
    mask = [True] * len(tokens) if ds.mask is None else ds.mask[ends[j] : ends[j + 1]].tolist()
    return tokens, mask


def trained_runs(tok, ds: PackedSFTDataset, j: int = 0) -> list[str]:
    tokens, mask = document(ds, j)
    runs, run = [], []
    for token, trained in zip(tokens, mask, strict=True):
        if trained:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def expected_document(tok, messages: list[dict], tools=None) -> list[int]:
    """`apply_chat_template`'s text, tokenized with one BOS and ended by exactly one EOS."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    if adds_bos(tok) and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token) :]  # the tokenizer adds it back
    if text.rstrip().endswith(tok.eos_token):
        return tok(text.rstrip())["input_ids"]  # the template's own end-of-turn is the EOS
    return tok(text)["input_ids"] + [tok.eos_token_id]


# --- every assistant turn, end-of-turn included, and nothing else ---------------------------


@pytest.mark.parametrize("chat_tokenizer", PARAMS, indirect=True)
def test_every_assistant_turn_and_nothing_else_is_trained(chat_tokenizer, tmp_path):
    tok, end_of_turn = chat_tokenizer
    ds = pack(tok, write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2))
    tokens, _ = document(ds)
    assert tokens == expected_document(tok, CONVERSATION)  # exact: one BOS, one EOS
    if adds_bos(tok):  # (SmolLM2 names <|im_start|> its BOS but adds none: not a BOS here)
        assert tokens.count(tok.bos_token_id) == 1 and tokens[0] == tok.bos_token_id
    assert tokens[-1] == tok.eos_token_id and tokens[-2] != tok.eos_token_id
    runs = [f"{answer}{end_of_turn}" for answer in ANSWERS]
    if tok.eos_token != end_of_turn:  # Gemma: <end_of_turn>\n, then the appended <eos>
        runs.append(tok.eos_token)
    assert trained_runs(tok, ds) == runs == trained_runs(tok, ds, 1)
    # The labels agree with the mask: a label is kept exactly where its target is trained.
    labels = np.concatenate([ds[i]["labels"].numpy() for i in range(len(ds))])
    targets = ds.tokens[1 : len(labels) + 1]
    kept = ds.mask[1 : len(labels) + 1]
    assert np.array_equal(labels, np.where(kept, targets, IGNORE_INDEX))


@pytest.mark.parametrize("chat_tokenizer", PARAMS, indirect=True)
def test_last_trains_only_the_final_turn(chat_tokenizer, tmp_path):
    tok, end_of_turn = chat_tokenizer
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    runs = trained_runs(tok, pack(tok, path, train_on="last"))
    assert runs[0] == f"{ANSWERS[-1]}{end_of_turn}" and len(runs) == 1 + (
        tok.eos_token != end_of_turn
    )
    everything = pack(tok, path, train_on="all")
    assert everything.mask is None and everything.num_trained_tokens == len(everything) * 8


def test_response_only_is_assistant_and_auto_depends_on_the_format(llama3, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    assistant = pack(llama3, path, train_on="assistant")
    assert pack(llama3, path).train_on == "assistant"  # auto, for chats
    assert np.array_equal(pack(llama3, path, response_only=True).mask, assistant.mask)
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 2.", "output": "4"}]
    )
    assert pack(llama3, alpaca).train_on == "all" and pack(llama3, alpaca).mask is None
    with pytest.raises(ConfigError, match="--response-only means --train-on assistant"):
        pack(llama3, path, train_on="last", response_only=True)


# --- formats ----------------------------------------------------------------------------------


def test_sharegpt_and_openai_records_give_identical_tokens_and_labels(smollm2_tokenizer, tmp_path):
    sharegpt = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in CONVERSATION]
    a = pack(smollm2_tokenizer, write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}]))
    b = pack(smollm2_tokenizer, write_jsonl(tmp_path / "b.jsonl", [{"conversations": sharegpt}]))
    assert (a.stats.format, b.stats.format) == ("messages", "sharegpt")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    for i in range(len(a)):
        assert a[i]["labels"].tolist() == b[i]["labels"].tolist()


def test_tool_calls_render_through_the_template(llama31, tmp_path):
    tok = llama31
    a = pack(tok, write_jsonl(tmp_path / "a.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}]))
    tokens, _ = document(a)
    assert tokens == expected_document(tok, TOOL_CHAT, TOOLS)
    text = tok.decode(tokens)
    assert '"name": "get_weather"' in text and "Environment: ipython" in text  # the tools list
    assert trained_runs(tok, a) == [  # the call and the answer; not the tool's result
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C and sunny.<|eot_id|>",
    ]
    # ShareGPT's function_call/observation, tools as LLaMA-Factory writes them (a JSON string).
    row = {"conversations": TOOL_SHAREGPT, "tools": json.dumps(TOOLS)}
    b = pack(tok, write_jsonl(tmp_path / "b.jsonl", [row]))
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)


def test_template_without_tools_refuses_tool_calls(smollm2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CHAT}])
    with pytest.raises(DataError) as error:
        pack(smollm2_tokenizer, path)
    assert str(error.value).startswith(f"{path}:1: ") and "\n" not in str(error.value)
    assert "does not render tool calls: use --chat-template chatml" in str(error.value)


def test_shipped_chatml_renders_tools_and_trains_the_calls(chatml, tmp_path):
    tok = chatml
    a = pack(tok, write_jsonl(tmp_path / "a.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}]))
    tokens, _ = document(a)
    assert tokens == expected_document(tok, TOOL_CHAT, TOOLS)  # apply_chat_template's own
    text = tok.decode(tokens)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>tool\n18 C, sunny<|im_end|>" in text
    assert trained_runs(tok, a) == [  # the call and the answer; not the tool's result
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 C and sunny.<|im_end|>",
    ]
    row = {"conversations": TOOL_SHAREGPT, "tools": json.dumps(TOOLS)}
    b = pack(tok, write_jsonl(tmp_path / "b.jsonl", [row]))
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    # A system prompt goes before the tools; two calls in one turn, arguments kept as given.
    two = [
        SYSTEM,
        TOOL_CHAT[0],
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"function": CALL}] * 2},
        {"role": "tool", "content": "18 C"},
        {"role": "tool", "content": "19 C"},
        TOOL_CHAT[3],
    ]
    c = pack(tok, write_jsonl(tmp_path / "c.jsonl", [{"messages": two, "tools": TOOLS}]))
    assert tok.decode(document(c)[0]).startswith(
        f"<|im_start|>system\n{SYSTEM['content']}\n\n# Tools"
    )
    assert trained_runs(tok, c)[0].startswith("Checking.\n<tool_call>")
    assert trained_runs(tok, c)[0].count("<tool_call>") == 2


def test_the_error_names_the_given_template(chatml, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": TURNS}])
    with (
        template(chatml, "{{ raise_exception('nope') }}"),
        pytest.raises(DataError, match=r":1: --chat-template chatml fails: nope"),
    ):
        pack(chatml, path)


def test_no_template_says_how_to_give_one(llama3_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}])
    with pytest.raises(DataError) as error:
        pack(llama3_tokenizer, path)
    assert str(error.value) == (
        f"{path}:1: chat records need a chat template and the tokenizer of "
        f"{llama3_tokenizer.name_or_path} has none: give one with --chat-template NAME "
        "(chatml, llama3) or --chat-template FILE (Jinja)"
    )


def test_per_message_train_false_and_weight_zero_opt_out(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    openai = [dict(m, train=False) if m["content"] == ANSWERS[0] else m for m in CONVERSATION]
    sharegpt = [
        {"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]}
        | ({"weight": 0} if m["content"] == ANSWERS[0] else {})
        for m in CONVERSATION
    ]
    a = pack(tok, write_jsonl(tmp_path / "a.jsonl", [{"messages": openai}]))
    b = pack(tok, write_jsonl(tmp_path / "b.jsonl", [{"conversations": sharegpt}]))
    assert trained_runs(tok, a) == [f"{answer}<|im_end|>" for answer in ANSWERS[1:]]
    assert np.array_equal(a.mask, b.mask)
    everything = pack(tok, tmp_path / "a.jsonl", train_on="all")  # all but the opted-out turn
    tokens, mask = document(everything)
    skipped = tok(f"{ANSWERS[0]}<|im_end|>", add_special_tokens=False)["input_ids"]
    assert mask.count(False) == len(skipped)
    assert [t for t, m in zip(tokens, mask, strict=True) if not m] == skipped


def test_default_system_prompt_only_where_there_is_none(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}, {"messages": CONVERSATION}])
    ds = pack(tok, path, system_prompt="Be terse.")
    first, second = (tok.decode(document(ds, j)[0]) for j in (0, 1))
    assert first.startswith("<|im_start|>system\nBe terse.<|im_end|>")  # not SmolLM2's default
    assert second.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>")
    assert trained_runs(tok, ds) == [f"{answer}<|im_end|>" for answer in ANSWERS]
    assert [r.messages[0]["content"] for r in ds.sample_records(2)] == [
        "Be terse.",
        SYSTEM["content"],
    ]


# --- refusing what cannot be masked right -----------------------------------------------------


def test_template_that_is_not_prefix_consistent_is_refused(llama3, tmp_path):
    with template(llama3, DROPS_EARLIER_THOUGHTS, "thinking-model") as tok:
        _refused_as_not_prefix_consistent(tok, tmp_path)


def _refused_as_not_prefix_consistent(tok, tmp_path):
    thought = [
        TURNS[0],
        {"role": "assistant", "content": "<think>Greet.</think>Hello!"},
        *TURNS[2:],
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}, {"messages": thought}])
    with pytest.raises(DataError) as error:
        pack(tok, path)
    message = str(error.value)
    assert message.startswith(
        f"{path}:2: the chat template of thinking-model is not prefix-consistent"
    )
    assert "\n" not in message
    assert pack(tok, path, train_on="all").mask is None  # every token: no turn to locate


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": [TURNS[0], TURNS[2], TURNS[1]]}, "two user turns in a row"),
        (
            {"messages": [TURNS[0], {"role": "assistant", "content": "  "}]},
            "message 1: empty content",
        ),
        ({"messages": [SYSTEM, TURNS[0]]}, "no assistant turn to train on (--train-on assistant)"),
        ({"messages": [{"role": "narrator", "content": "Once"}]}, "unknown role 'narrator'"),
        ({"messages": TURNS, "tools": {"name": "x"}}, "field 'tools': must be a list"),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            "this record is ShareGPT conversations, but the file's first record (line 1) is "
            "OpenAI messages: one format per file",
        ),
        (
            {"messages": [TURNS[0], {"role": "assistant", "tool_calls": [{"function": CALL}] * 2}]},
            "fails: This model only supports single tool-calls at once!",
        ),
    ],
    ids=[
        "roles-out-of-order",
        "empty",
        "no-assistant",
        "unknown-role",
        "tools",
        "mixed",
        "template",
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(llama31, tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": TURNS, "tools": TOOLS}, row])
    with pytest.raises(DataError) as error:
        pack(llama31, path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: ") and problem in message and "\n" not in message


def test_no_assistant_turn_is_fine_when_training_on_everything(llama3, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [SYSTEM, TURNS[0]]}])
    assert pack(llama3, path, seq_length=4, train_on="all").mask is None


# --- cache ------------------------------------------------------------------------------------


def test_cache_keys_on_the_template_the_mode_and_the_system_prompt(llama3, tmp_path):
    with template(llama3, LLAMA3_INSTRUCT) as tok:
        _cache_keys(tok, tmp_path)


def _cache_keys(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    cache = tmp_path / "cache"

    def from_cache(**kwargs) -> bool:
        return pack(tok, path, cache_dir=cache, **kwargs).stats.from_cache

    assert not from_cache(train_on="assistant")
    assert from_cache(train_on="assistant") and from_cache()  # auto resolves to assistant
    assert not from_cache(train_on="last") and not from_cache(train_on="all")
    assert not from_cache(system_prompt="Be terse.")
    tok.chat_template = LLAMA3_INSTRUCT.replace("'<|eot_id|>'", "'<|eot_id|>' + '\\n'")
    assert not from_cache()
    assert len(list(cache.iterdir())) == 5


# --- config and command line --------------------------------------------------------------------


def test_config_train_on_and_the_response_only_alias():
    assert config.from_flat({"train_on": "last"}).data.train_on == "last"
    with pytest.raises(ConfigError, match="train-on"):
        config.from_flat({"train_on": "everything"})
    with pytest.raises(ConfigError, match="--response-only means --train-on assistant"):
        config.from_flat({"response_only": True, "train_on": "all"})
    assert config.from_flat({"response_only": True, "system_prompt": "Hi"}).data.train_on == "auto"


@pytest.fixture
def served(llama3, monkeypatch):
    """`sftune prepare --tokenizer llama3` serves the Llama 3 Instruct tokenizer."""
    from sftune import models

    monkeypatch.setattr(models, "load_tokenizer", lambda name: llama3)
    return llama3


def test_prepare_show_marks_trained_tokens(served, tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    code = main(
        ["prepare", str(path), "--tokenizer", "llama3", "--seq-length", "16", "--show", "2"]
    )
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "OpenAI messages records (detected), training on assistant turns: 3 documents" in out
    assert out.count("--- document") == 2 and "(record 2)" in out
    assert "[[Hello! How can I help?<|eot_id|>]]" in out and "[[It is 6.<|eot_id|>]]" in out
    assert "[[" not in out.split("assistant<|end_header_id|>")[0]  # the system and user turns
    ds = pack(served, path, train_on="last")
    coloured = show_documents(ds, served, 1, colour=True)
    assert "\033[1;32mIt is 6.<|eot_id|>\033[0m" in coloured and "[[" not in coloured


def test_prepare_refuses_response_only_with_another_mode(served, tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    args = ["prepare", str(path), "--tokenizer", "x", "--seq-length", "8", "--response-only"]
    assert main([*args, "--train-on", "last"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--response-only means --train-on assistant" in err
    assert main([*args, "--show", "-1"]) == 2


def test_generation_prompt_opens_with_the_system_prompt(smollm2_tokenizer):
    from sftune.train.generate import prompt_ids

    text = smollm2_tokenizer.decode(prompt_ids(smollm2_tokenizer, "Hi", "chat", "Be brief."))
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_token_starts_from_byte_lengths_equal_the_offsets(llama3, smollm2_tokenizer):
    """Byte-level BPE: positions from the ids' byte lengths (encode_batch_fast, no offsets)
    give the masks the tokenizer's character offsets give, non-ASCII text included;
    a batch whose bytes do not add up falls back to the offsets."""
    from sftune.data.formats import Record
    from sftune.data.templates import DocumentRenderer
    from sftune.data.tokenize import DocumentEncoder

    accents = [dict(m, content=m["content"] + " — déjà vu, 東京 🚀") for m in CONVERSATION]
    for tok in (llama3, smollm2_tokenizer):
        renderer = DocumentRenderer(tok, "assistant")
        chats = (CONVERSATION, accents, CONVERSATION[1:3])
        docs = [renderer.render(Record("", "", tuple(c))) for c in chats]
        args = [[d.text for d in docs], [d.spans for d in docs], [d.ends_with_eos for d in docs]]
        by_bytes = DocumentEncoder(tok, masked=True)
        by_offsets = DocumentEncoder(tok, masked=True)
        by_offsets._bytes_decided = True  # token_bytes None: offsets
        a, b = by_bytes.encode(*args), by_offsets.encode(*args)
        assert by_bytes.token_bytes is not None
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        broken = DocumentEncoder(tok, masked=True)
        broken._bytes_decided, broken.token_bytes = True, by_bytes.token_bytes + 1
        c = broken.encode(*args)
        assert broken.token_bytes is None and all(
            np.array_equal(x, y) for x, y in zip(a, c, strict=True)
        )


# --- --chat-template on the command line; preset tokenizers without their model ---------------


def test_prepare_trains_tool_calls_of_the_smollm2_preset_with_chatml(tmp_path, capsys):
    """The issue's command, with the real preset tokenizer: read from the GGUF, no weights."""
    import os

    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}] * 3)
    args = ["prepare", str(path), "--tokenizer", "smollm2-135m", "--seq-length", "256"]
    assert main([*args, "--show", "1"]) == 2  # SmolLM2's own template has no tools
    assert "use --chat-template chatml" in capsys.readouterr().err
    assert main([*args, "--show", "1", "--chat-template", "chatml"]) == 0
    out = capsys.readouterr().out
    assert '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in out
    cache = Path(os.environ["SFTUNE_CACHE_DIR"])
    files = [f for f in cache.rglob("*") if f.is_file()]
    assert files and not any(f.suffix in (".safetensors", ".bin", ".gguf", ".pt") for f in files)
    assert not (cache / "models").exists()  # no model was converted for a tokenizer
    # A FILE gives the same tokens as the NAME holding the same text: the cache entry is reused.
    (tmp_path / "mine.jinja").write_text(CHATML)
    assert main([*args, "--chat-template", str(tmp_path / "mine.jinja")]) == 0
    assert "loaded from cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "neither a named template (chatml, llama3) nor a file"),
        ("{% for m in messages %}", "mine.jinja:1: Jinja syntax error: Unexpected end of template"),
        ("  \n", "the file is empty"),
    ],
    ids=["missing", "syntax", "empty"],
)
def test_bad_chat_template_is_one_line(served, tmp_path, capsys, text, message):
    template_file = tmp_path / "mine.jinja"
    if text is not None:
        template_file.write_text(text)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    args = ["prepare", str(path), "--tokenizer", "x", "--seq-length", "8"]
    assert main([*args, "--chat-template", str(template_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--chat-template {template_file}" in err and message in err


def test_named_templates_are_listed_in_the_flag_help():
    assert set(NAMED_TEMPLATES) == {"chatml", "llama3"}
    assert "chatml, llama3" in config.FIELDS["chat_template"][1].metadata["help"]


def test_a_converted_preset_lends_its_tokenizer(monkeypatch, tmp_path):
    """After a model load converted the preset, a tokenizer load reads that copy (no GGUF);
    the tokenizer's own directory, when `prepare` made it first, is read before it."""
    from sftune import models, presets

    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_tokenizer", lambda *a: pytest.fail("read the GGUF"))
    converted = presets.preset_cache_dir("smollm2-135m")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert models.ensure_preset_tokenizer("smollm2-135m") == converted
    own = presets.preset_tokenizer_dir("smollm2-135m")
    own.mkdir(parents=True)
    (own / "tokenizer_config.json").write_text("{}")
    assert models.ensure_preset_tokenizer("smollm2-135m") == own
