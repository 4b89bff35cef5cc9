"""Chat documents (issue 18): no lost first token, no doubled BOS, exactly one trained EOS.

SmolLM2 names `<|im_start|>` its BOS without adding it when encoding, and its EOS
`<|im_end|>` is also the template's end-of-turn marker; Llama 3 adds a real BOS that a chat
template may write too. Both are checked on real tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import processors

from sftune.data import IGNORE_INDEX, PackedSFTDataset, render_chat
from sftune.data.tokenize import DocumentEncoder

CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
]
# Llama 3 Instruct's shape: the template writes the BOS and ends each turn with <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture
def smollm2(smollm2_tokenizer):
    """The SmolLM2-135M tokenizer (shared: do not mutate)."""
    return smollm2_tokenizer


@pytest.fixture
def llama3_instruct(llama3_copy):
    """Llama 3 with an Instruct-style chat template and <|eot_id|> as its EOS."""
    llama3_copy.chat_template = LLAMA3_CHAT_TEMPLATE
    llama3_copy.eos_token = "<|eot_id|>"
    return llama3_copy


def chat_file(tmp_path: Path, copies: int = 3) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(copies)))
    return path


def pack(tokenizer, path, seq_length=8, **kwargs) -> PackedSFTDataset:
    return PackedSFTDataset(tokenizer, path, seq_length, False, verbose=False, **kwargs)


def first_document(ds: PackedSFTDataset) -> list[int]:
    return ds.tokens[: ds.doc_starts[1]].tolist()


def trained_labels(ds: PackedSFTDataset) -> list[int]:
    return [t for i in range(len(ds)) for t in ds[i]["labels"].tolist() if t != IGNORE_INDEX]


# --- SmolLM2: <|im_start|> is named BOS but not added; <|im_end|> is EOS and end of turn ----


def test_smollm2_chat_keeps_its_first_token(smollm2):
    assert smollm2.bos_token == "<|im_start|>" and smollm2("x")["input_ids"][0] != 1
    prompt_part, text = render_chat(CHAT, smollm2)
    assert text.startswith("<|im_start|>system\nYou are")
    assert prompt_part.startswith("<|im_start|>system\n") and text.startswith(prompt_part)


def test_smollm2_chat_document_ends_with_exactly_one_eos(smollm2, tmp_path):
    tok = smollm2
    ds = pack(tok, chat_file(tmp_path))
    doc = first_document(ds)
    _, text = render_chat(CHAT, tok)
    assert text.endswith("<|im_end|>\n")
    assert doc == tok(text.removesuffix("\n"))["input_ids"]  # cut after the EOS, none added
    names = tok.convert_ids_to_tokens(doc)
    assert names[:2] == ["<|im_start|>", "system"]
    assert names[-2:] == ["yo", "<|im_end|>"]
    assert names.count("<|im_end|>") == 3  # the system, user and assistant turns, once each
    # Documents follow each other directly: ... <|im_end|> <|im_start|> system ...
    second = ds.tokens[ds.doc_starts[1] : ds.doc_starts[1] + 2].tolist()
    assert tok.convert_ids_to_tokens(second) == ["<|im_start|>", "system"]


def test_smollm2_response_only_trains_answer_then_one_eos(smollm2, tmp_path):
    tok = smollm2
    ds = pack(tok, chat_file(tmp_path), response_only=True)
    response = tok("yo<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(response)[-1] == "<|im_end|>"
    trained = trained_labels(ds)
    assert trained[: len(response)] == response  # the first document's trained labels
    assert trained[len(response) : 2 * len(response)] == response  # the next one's: no extra
    assert ds.num_trained_tokens == len(trained)


# --- Llama 3: a real BOS, added by the post-processor ------------------------------------


def test_llama3_template_bos_is_not_doubled_and_first_token_kept(llama3_instruct, tmp_path):
    tok = llama3_instruct
    prompt_part, text = render_chat(CHAT, tok)
    assert text.startswith("<|start_header_id|>user") and text.startswith(prompt_part)
    doc = first_document(pack(tok, chat_file(tmp_path)))
    assert doc[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert doc.count(tok.bos_token_id) == 1
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token_id == eot and doc[-1] == eot and doc[-2] != eot
    assert tok.convert_tokens_to_ids("<|end_of_text|>") not in doc


def test_llama3_response_only_trains_answer_then_one_eos(llama3_instruct, tmp_path):
    tok = llama3_instruct
    ds = pack(tok, chat_file(tmp_path), seq_length=4, response_only=True)
    response = tok("yo<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert trained_labels(ds)[: 2 * len(response)] == response * 2


def test_bos_written_by_template_stays_when_tokenizer_adds_none(llama3_instruct, tmp_path):
    tok = llama3_instruct
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok("x")["input_ids"][0] != tok.bos_token_id
    _, text = render_chat(CHAT, tok)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    doc = first_document(pack(tok, chat_file(tmp_path)))
    assert doc[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert doc.count(tok.bos_token_id) == 1


def test_chat_not_ending_in_eos_gets_eos_appended(llama3_copy, tmp_path):
    """Template ends turns with <|eot_id|>, EOS is <|end_of_text|>: the course rule applies."""
    tok = llama3_copy
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    doc = first_document(pack(tok, chat_file(tmp_path)))
    assert doc[-2:] == [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id]


def test_eos_text_that_does_not_encode_to_eos_still_gets_one(llama3_copy):
    """A flagged document whose last token is not the EOS id gets the EOS appended."""
    tok = llama3_copy
    eos = tok.eos_token_id
    tokens, lengths, _ = DocumentEncoder(tok, False).encode(
        ["Hi<|end_of_text|>", "Hi there", "Yo"], [0, 0, 0], [True, True, False]
    )
    hi, hi_there, yo = (tok(t)["input_ids"] for t in ["Hi", "Hi there", "Yo"])
    assert tokens.tolist() == hi + [eos] + hi_there + [eos] + yo + [eos]
    assert lengths.tolist() == [len(hi) + 1, len(hi_there) + 1, len(yo) + 1]


@pytest.mark.slow  # a run and an export: about 15 s on 2 cores
def test_chat_template_trains_and_travels_with_final_and_export(workdir, tmp_path):
    """`--chat-template chatml` on a tokenizer without one (the tiny byte tokenizer): the run
    trains its tool-call chats, `final/` and an export of its checkpoint carry the template,
    and the saved config names it (so a resumed run or `export` reads the same one)."""
    from transformers import AutoTokenizer

    from sftune.cli import main
    from sftune.data.chat_templates import CHATML
    from sftune.train.loop import train
    from trainutil import tiny_config

    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 2?"},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": str(i + 2)},
                {"role": "assistant", "content": f"It is {i + 2}."},
            ],
            "tools": tools,
        }
        for i in range(20)
    ]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(
        workdir,
        tmp_path / "run",
        train_data=str(data),
        chat_template="chatml",
        seq_length=64,
        batch_size=2,
        max_steps=2,
        save_every=2,
        val_fraction=0.1,
    )
    run = train(cfg).output_dir
    assert AutoTokenizer.from_pretrained(run / "final").chat_template == CHATML
    assert "chat_template: chatml" in (run / "config.yaml").read_text()
    out = tmp_path / "export"
    assert main(["export", str(run / "checkpoints" / "step_00000002"), "--out", str(out)]) == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
