"""PackedSFTDataset: the course fixture token for token, options, cache and bad input."""

from __future__ import annotations

import doctest
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sftune.data import (
    ALPACA_TEMPLATE,
    IGNORE_INDEX,
    PackedSFTDataset,
    batches,
    cache,
    formats,
    packing,
    render_alpaca,
    sampler,
    templates,
    tokenize,
)
from sftune.data.show import show_documents
from sftune.data.tokenize import DocumentEncoder
from sftune.errors import DataError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture
def sample(shared) -> Path:
    return shared / "fixtures/cs336/sft_sample.jsonl"


def pack(tokenizer, path, seq_length=32, shuffle=False, **kwargs) -> PackedSFTDataset:
    return PackedSFTDataset(tokenizer, path, seq_length, shuffle, verbose=False, **kwargs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_template_is_exact():
    assert ALPACA_TEMPLATE == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
    )
    prompt_part, text = render_alpaca("P {x}", "R")
    assert text == ALPACA_TEMPLATE.format(prompt="P {x}", response="R")
    assert text == prompt_part + "R"


def test_matches_course_fixture(llama3_tokenizer, sample):
    expected = json.loads((sample.parent / "tokenized_sft_sample.json").read_text())
    ds = pack(llama3_tokenizer, sample)
    assert len(ds) == len(expected) == 75
    for i, want in enumerate(expected):
        item = ds[i]
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["input_ids"].tolist() == want["input_ids"], i
        assert item["labels"].tolist() == want["labels"], i
    assert ds.stats.items == 75 and ds.stats.documents == 5
    assert ds.stats.tokens_kept_fraction == pytest.approx(75 * 32 / ds.stats.tokens)
    assert ds.num_trained_tokens == 75 * 32
    with pytest.raises(IndexError):
        ds[75]
    assert ds[-1]["labels"].tolist() == expected[-1]["labels"]


def test_shuffle_is_seeded_permutation_of_documents(llama3_tokenizer, sample):
    plain = pack(llama3_tokenizer, sample)
    shuffled = pack(llama3_tokenizer, sample, shuffle=True, seed=1)
    again = pack(llama3_tokenizer, sample, shuffle=True, seed=1)
    other = pack(llama3_tokenizer, sample, shuffle=True, seed=2)
    assert [shuffled[i]["input_ids"].tolist() for i in range(len(shuffled))] != [
        plain[i]["input_ids"].tolist() for i in range(len(plain))
    ]
    assert np.array_equal(shuffled.tokens, again.tokens)
    assert not np.array_equal(shuffled.tokens, other.tokens)
    assert Counter(shuffled.tokens.tolist()) == Counter(plain.tokens.tolist())
    assert sorted(_documents(shuffled)) == sorted(_documents(plain))


def _documents(ds: PackedSFTDataset) -> list[tuple[int, ...]]:
    bounds = [*ds.doc_starts.tolist(), len(ds.tokens)]
    return [tuple(ds.tokens[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_backend_encoding_equals_tokenizer_call(llama3_tokenizer, shared):
    lines = (shared / "data/gsm8k/test.jsonl").read_text().splitlines()[:300]
    texts = [render_alpaca(r["question"], r["answer"])[1] for r in map(json.loads, lines)]
    tokens, lengths, _ = DocumentEncoder(llama3_tokenizer, False).encode(texts, [0] * len(texts))
    expected = [ids + [llama3_tokenizer.eos_token_id] for ids in llama3_tokenizer(texts).input_ids]
    assert tokens.tolist() == [t for ids in expected for t in ids]
    assert lengths.tolist() == [len(ids) for ids in expected]


def test_response_only_trains_exactly_response_and_eos(llama3_tokenizer, tmp_path):
    tok = llama3_tokenizer
    rows = [
        {"prompt": "Add 2 and 2.", "response": "Four, since 2 + 2 = 4."},
        {"prompt": "Name a colour.", "response": "Blue is one."},
        {"prompt": "Say nothing.", "response": ""},
    ]
    path = write_jsonl(tmp_path / "tiny.jsonl", rows)
    expected_stream, expected_trained = [], []
    for row in rows:
        prompt_part, text = render_alpaca(row["prompt"], row["response"])
        prompt_ids = tok(prompt_part).input_ids
        response_ids = tok(row["response"], add_special_tokens=False).input_ids
        assert tok(text).input_ids == prompt_ids + response_ids  # a clean boundary
        expected_stream += prompt_ids + response_ids + [tok.eos_token_id]
        expected_trained += [False] * len(prompt_ids) + [True] * (len(response_ids) + 1)

    masked = pack(tok, path, seq_length=7, response_only=True)
    plain = pack(tok, path, seq_length=7)
    assert masked.tokens.tolist() == expected_stream
    for i in range(len(plain)):
        assert masked[i]["input_ids"].tolist() == plain[i]["input_ids"].tolist()
        trained = expected_trained[i * 7 + 1 : (i + 1) * 7 + 1]
        want = [
            t if keep else IGNORE_INDEX
            for t, keep in zip(plain[i]["labels"].tolist(), trained, strict=True)
        ]
        assert masked[i]["labels"].tolist() == want
    assert masked.num_trained_tokens == sum(expected_trained[1 : len(masked) * 7 + 1])


def test_position_ids_restart_at_documents_and_items(llama3_tokenizer, sample):
    ds = pack(llama3_tokenizer, sample, position_ids=True)
    starts = set(ds.doc_starts.tolist())
    for i in range(len(ds)):
        positions = ds[i]["position_ids"]
        assert positions.dtype == torch.long and positions.shape == (32,)
        want, p = [], 0
        for j in range(32):
            p = 0 if j == 0 or i * 32 + j in starts else p + 1
            want.append(p)
        assert positions.tolist() == want
    # Item 28 starts in the middle of the first document and the second starts inside it.
    assert 0 in ds[28]["position_ids"].tolist()[1:]


def test_holdout_splits_documents_complementarily(llama3_tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    full = pack(llama3_tokenizer, path, seq_length=8)
    train = pack(llama3_tokenizer, path, seq_length=8, holdout_fraction=0.25, seed=3)
    held = pack(llama3_tokenizer, path, seq_length=8, holdout_fraction=0.25, holdout=True, seed=3)
    assert (train.stats.documents, held.stats.documents) == (30, 10)
    assert sorted(_documents(train) + _documents(held)) == sorted(_documents(full))
    held_other = pack(llama3_tokenizer, path, seq_length=8, holdout_fraction=0.25, holdout=True)
    assert sorted(_documents(held_other)) != sorted(_documents(held))


def test_sample_records_evenly_spaced_in_file_order(llama3_tokenizer, tmp_path):
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    fields = {"prompt": "question", "response": "answer"}
    for shuffle in (False, True):
        ds = pack(llama3_tokenizer, path, seq_length=8, shuffle=shuffle, fields=fields, seed=5)
        assert ds.path == path and ds.fields == fields
        assert ds.document_indices.tolist() == list(range(40))
        picked = ds.sample_records(4)
        assert [r.prompt for r in picked] == [f"Question {i}?" for i in (0, 10, 20, 30)]
        assert [r.line for r in picked] == [1, 11, 21, 31]
        assert picked[0].response == "Answer 0."
    assert ds.sample_records(0) == [] and len(ds.sample_records(100)) == 40


def test_sample_records_of_a_holdout_split(llama3_tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    split = dict(seq_length=8, holdout_fraction=0.25, seed=3)
    train = pack(llama3_tokenizer, path, shuffle=True, **split)
    held = pack(llama3_tokenizer, path, holdout=True, **split)
    held_docs = packing.select_documents(40, 0.25, True, seed=3)
    assert held.document_indices.tolist() == held_docs.tolist()
    assert sorted([*train.document_indices, *held.document_indices]) == list(range(40))
    picked = held.sample_records(3)
    want = [held_docs[i * 10 // 3] for i in range(3)]
    assert [r.prompt for r in picked] == [f"Question {i}?" for i in want]
    assert [r.prompt for r in held.sample_records(50)] == [f"Question {i}?" for i in held_docs]
    train_prompts = {r.prompt for r in train.sample_records(30)}
    assert len(train_prompts) == 30 and not train_prompts & {r.prompt for r in picked}


def test_cache_key_changes_with_cache_version(llama3_tokenizer, sample, monkeypatch):
    key = cache.cache_key(llama3_tokenizer, sample, None, False)
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.cache_key(llama3_tokenizer, sample, None, False) != key


def test_cache_hit_and_key(llama3_tokenizer, tmp_path, sample, capsys):
    path = tmp_path / "sample.jsonl"
    path.write_bytes(sample.read_bytes())
    cache = tmp_path / "cache"
    first = PackedSFTDataset(llama3_tokenizer, path, 32, False, cache_dir=cache)
    second = PackedSFTDataset(llama3_tokenizer, path, 32, True, cache_dir=cache)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "built" in lines[0] and "from cache" in lines[1]
    assert "5 documents" in lines[0] and "75 items" in lines[0]
    assert (first.stats.from_cache, second.stats.from_cache) == (False, True)
    third = pack(llama3_tokenizer, path, cache_dir=cache)
    assert third.stats.from_cache and np.array_equal(third.tokens, first.tokens)
    assert [p.name for p in cache.iterdir()] == [f"sample.jsonl-{_key(cache)}"]

    path.write_bytes(sample.read_bytes().replace(b"George", b"Georgia"))
    changed = pack(llama3_tokenizer, path, cache_dir=cache)
    assert not changed.stats.from_cache and len(list(cache.iterdir())) == 2
    masked = pack(llama3_tokenizer, path, cache_dir=cache, response_only=True)
    assert not masked.stats.from_cache and len(list(cache.iterdir())) == 3


def _key(cache: Path) -> str:
    return next(cache.iterdir()).name.rsplit("-", 1)[1]


def test_default_cache_dir_and_no_cache(llama3_tokenizer, sample, monkeypatch, tmp_path):
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path / "root"))
    pack(llama3_tokenizer, sample)
    assert len(list((tmp_path / "root" / "packed").iterdir())) == 1
    pack(llama3_tokenizer, sample, cache_dir=tmp_path / "off", use_cache=False)
    assert not (tmp_path / "off").exists()


def test_messages_records_use_chat_template(llama3_copy, tmp_path):
    tok = llama3_copy
    tok.chat_template = CHAT_TEMPLATE
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 3)
    ds = pack(tok, path, seq_length=4, response_only=True)
    header = tok("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    response = tok("Hello there<|eot_id|>", add_special_tokens=False).input_ids
    doc = ds.tokens[: ds.doc_starts[1]].tolist()
    assert doc[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert doc.count(tok.bos_token_id) == 1  # the template's BOS is not doubled
    assert doc[-len(response) - 1 :] == response + [tok.eos_token_id]
    assert doc[-len(response) - 1 - len(header.input_ids) : -len(response) - 1] == header.input_ids
    trained = [t for i in range(len(ds)) for t in ds[i]["labels"].tolist() if t != IGNORE_INDEX]
    assert trained[: len(response) + 1] == response + [tok.eos_token_id]


def test_messages_without_chat_template_is_data_error(llama3_tokenizer, tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*chat template"):
        pack(llama3_tokenizer, path)


# --- --packing split|whole ----------------------------------------------------------------
# A byte tokenizer and a one-character-per-token chat template, so rows are written out by hand:
# ^ BOS, $ EOS, _ padding, . a label of -100; every other character is its own byte's token.

BYTE_CHAT = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture(scope="module")
def byte_chat():
    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = BYTE_CHAT
    return tok


def ids(tok, text: str) -> list[int]:
    special = {"^": tok.bos_token_id, "$": tok.eos_token_id, "_": tok.pad_token_id, ".": -100}
    return [special.get(c, ord(c)) for c in text]


def rows(ds: PackedSFTDataset) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def chats(tmp_path: Path, *turns: tuple[str, str]) -> Path:
    records = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
        for u, a in turns
    ]
    return write_jsonl(tmp_path / "chats.jsonl", records)


def test_split_cuts_a_conversation_and_says_how_many(byte_chat, tmp_path, capsys):
    path = chats(tmp_path, ("hi", "yo"), ("q", "a"), ("z", "k"))  # 12, 10 and 10 tokens
    ds = PackedSFTDataset(byte_chat, path, 24, False, use_cache=False)
    assert rows(ds) == [  # the course rule: the third conversation is cut after "^u:"
        (ids(byte_chat, "^u:hi|a:yo|$^u:q|a:a|$^u"), ids(byte_chat, ".......yo|$.......a|$..."))
    ]
    assert ds.stats.crossing == 1
    assert "1 of 3 conversations cross an item boundary" in capsys.readouterr().out


def test_whole_starts_a_conversation_that_does_not_fit_in_the_next_row(byte_chat, tmp_path, capsys):
    path = chats(tmp_path, ("hi", "yo"), ("q", "a"), ("z", "k"))
    ds = PackedSFTDataset(byte_chat, path, 24, False, packing="whole", position_ids=True)
    assert rows(ds) == [
        (ids(byte_chat, "^u:hi|a:yo|$^u:q|a:a|$__"), ids(byte_chat, ".......yo|$.......a|$...")),
        (ids(byte_chat, "^u:z|a:k|$" + "_" * 14), ids(byte_chat, "......k|$" + "." * 15)),
    ]
    # Positions restart at each conversation and at the padding, which follows every real
    # token, so (causal attention) it changes no real token's loss.
    assert ds[0]["position_ids"].tolist() == [*range(12), *range(10), 0, 1]
    assert ds[1]["position_ids"].tolist() == [*range(10), *range(14)]
    assert (ds.stats.moved, ds.stats.truncated, ds.stats.padding) == (1, 0, 18)
    assert ds.num_trained_tokens == 4 + 3 + 3
    out = capsys.readouterr().out
    assert "32 tokens -> 2 items of 24 (whole conversations: 100.0% of tokens kept" in out
    assert "18 padding tokens; moved to the next item: 1, truncated: 0" in out
    everything = pack(byte_chat, path, 24, packing="whole", train_on="all")
    assert rows(everything)[0][1] == ids(byte_chat, "u:hi|a:yo|$^u:q|a:a|$...")  # no padding


def test_padding_changes_no_real_tokens_logits(byte_chat, tmp_path):
    from tiny import build_tiny_model

    path = chats(tmp_path, ("hi", "yo"), ("z", "k"))
    batch = pack(byte_chat, path, 24, packing="whole", position_ids=True).get_batch([0])
    model = build_tiny_model(len(byte_chat)).double().eval()
    other = batch["input_ids"].clone()
    other[0, 22:] = ord("x")  # the padding (from 22 on) replaced by real text
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        b = model(input_ids=other, position_ids=batch["position_ids"]).logits
    assert torch.equal(a[0, :22], b[0, :22])


def test_whole_truncates_or_refuses_a_conversation_longer_than_a_row(byte_chat, tmp_path):
    story = ("tell me a story", "once upon a time")  # 39 tokens; a row holds 25
    path = chats(tmp_path, ("hi", "yo"), story, ("q", "a"))
    with pytest.raises(DataError) as error:
        pack(byte_chat, path, 24, packing="whole")
    assert str(error.value) == (
        f"{path}:2: a document of 39 tokens is too long for one item of --seq-length 24 (at "
        "most 25 tokens, its final EOS only a label): use --overlong truncate, a longer "
        "--seq-length, or --packing split"
    )
    ds = pack(byte_chat, path, 24, packing="whole", overlong="truncate")
    assert rows(ds) == [
        (ids(byte_chat, "^u:hi|a:yo|$" + "_" * 12), ids(byte_chat, ".......yo|$" + "." * 13)),
        (ids(byte_chat, "^u:tell me a story|a:onc"), ids(byte_chat, "." * 20 + "once")),
        (ids(byte_chat, "^u:q|a:a|$" + "_" * 14), ids(byte_chat, "......a|$" + "." * 15)),
    ]
    assert (ds.stats.moved, ds.stats.truncated) == (1, 1)  # the story moved; "q" found a full row
    shown = show_documents(ds, byte_chat, 2, colour=False)
    assert "^" not in shown and "<|pad|>" not in shown  # a document stops before the padding


def test_the_modes_share_one_cache_entry(byte_chat, tmp_path):
    path = chats(tmp_path, ("hi", "yo"), ("q", "a"), ("z", "k"))
    cache = tmp_path / "cache"
    split = pack(byte_chat, path, 24, cache_dir=cache)
    whole = pack(byte_chat, path, 24, cache_dir=cache, packing="whole")
    assert not split.stats.from_cache and whole.stats.from_cache  # the layout is applied on load
    assert len(whole) == 2 and len(list(cache.iterdir())) == 1


def test_whole_keeps_every_document_of_prompt_response_records(llama3_tokenizer, sample):
    split = pack(llama3_tokenizer, sample)
    whole = pack(llama3_tokenizer, sample, seq_length=1024, packing="whole")
    width = 1025
    assert len(whole.tokens) == len(whole) * width and whole.stats.documents == 5
    starts, ends = whole.doc_starts, whole.doc_ends
    assert np.all(starts // width == (ends - 1) // width)  # each document inside one row
    assert [
        tuple(whole.tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)
    ] == _documents(split)
    assert whole.stats.truncated == 0 and whole.stats.moved == len(whole) - 1
    assert "every token: 5 documents" in whole.stats.summary()
    assert "(98.7% of tokens kept)" in split.stats.summary()  # the course line, as it was


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("seq_length", [0, -3, "32", 2.5, True])
def test_bad_seq_length(llama3_tokenizer, sample, seq_length):
    with pytest.raises(DataError, match="seq_length must be an integer >= 1"):
        pack(llama3_tokenizer, sample, seq_length=seq_length)


def test_too_small_for_one_item(llama3_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    n = len(llama3_tokenizer(render_alpaca("Hi", "Yo")[1]).input_ids) + 1
    with pytest.raises(DataError, match=rf"small.jsonl: too small .*{n} tokens.* needs {n + 1}"):
        pack(llama3_tokenizer, path, seq_length=n)
    assert len(pack(llama3_tokenizer, path, seq_length=n - 1)) == 1


def test_tokenizer_without_eos(llama3_copy, sample):
    tok = llama3_copy
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        pack(tok, sample)


def test_bad_file_leaves_nothing_in_cache(llama3_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        pack(llama3_tokenizer, path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="no such file"):
        pack(llama3_tokenizer, tmp_path / "missing.jsonl")


@pytest.mark.parametrize("module", [formats, templates, tokenize, cache, packing, batches, sampler])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
