"""The data path at long lengths (issue 26): one render per chat, batches bounded in characters.

`DocumentRenderer` finds the trained turns of a chat rendered by a shipped template
(`--chat-template chatml|llama3`) from the prefix lengths noted during the one render of the
whole conversation, not by rendering each prefix (quadratic in the turns). These tests compare
both ways on the shipped chat examples and on a generated 50-turn agent transcript with tool
calls: the same texts, spans, tokens and masks. Long documents are tokenized in batches of at
most `tokenize.BATCH_CHARS` characters, so that a file of long traces never holds thousands of
them as Python token lists at once; the stream is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sftune.data import PackedSFTDataset, tokenize
from sftune.data.chat_templates import NAMED_TEMPLATES
from sftune.data.formats import read_records
from sftune.data.templates import DocumentRenderer, _ChatTemplate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "chats.jsonl"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


def agent_transcript(turns: int, *, system: bool = True, skip: int | None = None) -> dict:
    """A record of `turns` user turns, every other one answered by a tool call and its result
    before the answer; message `skip` (if given) opts out of training."""
    messages = [{"role": "system", "content": "You are a coding agent."}] if system else []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Step {i}: look at  the code.\n "})
        if i % 2:
            call = {"name": "read_file", "arguments": json.dumps({"path": f"src/f{i}.py"})}
            messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": call}],
                }
            )
            messages.append({"role": "tool", "content": f"def f{i}():\n    return {i}\n"})
        messages.append({"role": "assistant", "content": f" Done with step {i}. \n"})
    if skip is not None:
        messages[skip]["train"] = False
    return {"messages": messages, "tools": TOOLS}


@pytest.fixture(params=sorted(NAMED_TEMPLATES))
def templated(request, llama3_copy):
    llama3_copy.chat_template = NAMED_TEMPLATES[request.param]
    return llama3_copy


def prefix_by_prefix(monkeypatch):
    """Make `DocumentRenderer` render every prefix, as before this change."""

    def plain(self, messages, tools):
        return self.render([messages], tools, False)[0], None

    monkeypatch.setattr(_ChatTemplate, "render_noting_starts", plain)


def write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records_under_test(tmp_path: Path) -> list:
    generated = [
        agent_transcript(50),
        agent_transcript(7, system=False),
        agent_transcript(6, skip=4),
        agent_transcript(5, system=False, skip=0),
    ]
    return read_records(EXAMPLES) + read_records(write(tmp_path, generated))


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_documents_match_rendering_every_prefix(templated, train_on, tmp_path, monkeypatch):
    records = records_under_test(tmp_path)
    renderer = DocumentRenderer(templated, train_on)
    noted = [renderer.render(r) for r in records]
    assert renderer._chat.render_noting_starts(list(records[-4].messages), TOOLS)[1]
    prefix_by_prefix(monkeypatch)
    renderer = DocumentRenderer(templated, train_on)
    assert noted == [renderer.render(r) for r in records]
    if train_on == "assistant":
        assert any(d.spans and len(d.spans) > 50 for d in noted)  # the 50-turn transcript


def test_a_long_transcript_is_rendered_once(templated, tmp_path, monkeypatch):
    renders = []
    original = _ChatTemplate.render

    def counted(self, conversations, tools, generation):
        renders.append(len(conversations))
        return original(self, conversations, tools, generation)

    monkeypatch.setattr(_ChatTemplate, "render", counted)
    record = read_records(write(tmp_path, [agent_transcript(50)]))[0]
    DocumentRenderer(templated, "assistant").render(record)
    assert renders == []  # the one render is `render_noting_starts`'
    prefix_by_prefix(monkeypatch)
    DocumentRenderer(templated, "assistant").render(record)
    assert sum(renders) > 100  # before: one render per turn head and turn end


def test_packed_tokens_and_masks_match(templated, tmp_path, monkeypatch):
    path = write(tmp_path, [agent_transcript(50), agent_transcript(3, skip=2)])

    def pack():
        ds = PackedSFTDataset(templated, path, 512, False, use_cache=False, verbose=False)
        return ds.tokens.copy(), np.stack([ds[i]["labels"].numpy() for i in range(len(ds))])

    tokens, labels = pack()
    prefix_by_prefix(monkeypatch)
    old_tokens, old_labels = pack()
    assert np.array_equal(tokens, old_tokens) and np.array_equal(labels, old_labels)
    assert (labels != -100).sum() > 500  # the transcript's answers are trained


def test_smollm2_template_is_recognized_and_gives_the_same_documents(
    smollm2_tokenizer, tmp_path, monkeypatch
):
    from sftune.data.templates import SMOLLM2_INSTRUCT

    assert smollm2_tokenizer.chat_template == SMOLLM2_INSTRUCT  # the preset's, byte for byte
    plain = [r for r in read_records(EXAMPLES) if not r.tools]  # it renders no tools
    records = [r for r in plain if not any("tool_calls" in m for m in r.messages)]
    turns = [
        ({"role": "user", "content": f"Q {i}?"}, {"role": "assistant", "content": f"A {i}"})
        for i in range(50)
    ]
    long = {"messages": [m for turn in turns for m in turn]}  # 100 messages, no system
    records += read_records(write(tmp_path, [long]))
    noted = [DocumentRenderer(smollm2_tokenizer, "assistant").render(r) for r in records]
    starts = _ChatTemplate(smollm2_tokenizer).render_noting_starts(list(long["messages"]), None)[1]
    assert len(starts) == 100
    prefix_by_prefix(monkeypatch)
    assert noted == [DocumentRenderer(smollm2_tokenizer, "assistant").render(r) for r in records]


def test_other_templates_still_render_each_prefix(llama3_copy):
    llama3_copy.chat_template = NAMED_TEMPLATES["chatml"] + " "  # any other text
    chat = _ChatTemplate(llama3_copy)
    text, starts = chat.render_noting_starts(agent_transcript(2)["messages"], None)
    assert starts is None and text.startswith("<|im_start|>system")


def test_long_documents_are_encoded_in_batches_of_bounded_characters(
    templated, tmp_path, monkeypatch
):
    path = write(tmp_path, [agent_transcript(n) for n in (30, 2, 25, 3, 3, 40)])

    def pack():
        ds = PackedSFTDataset(templated, path, 256, False, use_cache=False, verbose=False)
        return ds.tokens.copy(), np.stack([ds[i]["labels"].numpy() for i in range(len(ds))])

    sizes = []
    encode = tokenize.DocumentEncoder.encode

    def counted(self, texts, *args):
        sizes.append(len(texts))
        return encode(self, texts, *args)

    monkeypatch.setattr(tokenize.DocumentEncoder, "encode", counted)
    tokens, labels = pack()
    assert sizes == [6]
    records = read_records(path)
    chars = [tokenize.record_chars(r) for r in records]
    monkeypatch.setattr(tokenize, "BATCH_CHARS", chars[0] + chars[1])
    sizes.clear()
    bounded_tokens, bounded_labels = pack()
    assert sizes == [2, 3, 1]  # 30+2 turns; 25+3+3 (fewer characters than 30+2); 40 alone
    assert np.array_equal(tokens, bounded_tokens) and np.array_equal(labels, bounded_labels)


def test_a_dense_document_mask_past_32k_is_refused_in_one_line():
    from sftune import config as config_mod
    from sftune.errors import ConfigError

    long = {"doc_mask": "on", "seq_length": 65536}
    for attn in ("sdpa", "eager"):
        with pytest.raises(ConfigError, match=r"^--doc-mask on with --attn .*flex_attention"):
            config_mod.from_flat({**long, "attn": attn})
    for ok in (
        {**long, "attn": "flex_attention"},
        {**long, "attn": "sdpa", "doc_mask": "off"},
        {**long, "attn": "sdpa", "seq_length": 32768},
    ):
        config_mod.from_flat(ok)


def test_packed_documents_attend_within_themselves_fp64():
    """What the doc mask relies on: position_ids restarting at 0, no attention_mask and no
    cache make transformers mask attention by document (the same logits as one forward per
    document); with a cache it would not."""
    import torch

    from tiny import build_tiny_model

    model = build_tiny_model(100, dtype=torch.float64).eval()
    docs = [5, 9, 3]
    ids = torch.randint(0, 100, (1, sum(docs)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    with torch.no_grad():
        separate = torch.cat([model(input_ids=d).logits for d in ids.split(docs, dim=1)], 1)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        cached = model(input_ids=ids, position_ids=positions, use_cache=True).logits
    torch.testing.assert_close(packed, separate, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(cached[:, 5:], separate[:, 5:])
