"""Preference pairs (issue 25 "Data"): the three forms, the files, every bad input's one line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftune.data.chat_templates import set_chat_template
from sftune.data.preference import (
    CONVERSATIONAL,
    HH,
    STRINGS,
    Pair,
    PairEncoder,
    check_not_pairs,
    parse_pair_fields,
    peek_pairs,
    read_pairs,
    render_pair,
)
from sftune.data.templates import render_alpaca
from sftune.data.tokenize import build_stream
from sftune.errors import DataError

STRING_PAIRS = [
    {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
]
USER = {"role": "user", "content": "2+2?"}
CHAT_PAIR = {
    "prompt": [{"role": "system", "content": "Be brief."}, USER],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5, I think"}],
}
HH_SINGLE = {
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5.",
}
HH_MULTI = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 22",
}


def jsonl(tmp_path: Path, records, name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read_pairs(path, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("records", "form"),
    [(STRING_PAIRS, STRINGS), ([CHAT_PAIR], CONVERSATIONAL), ([HH_SINGLE, HH_MULTI], HH)],
)
def test_each_form_is_read_and_named(tmp_path, records, form):
    path = jsonl(tmp_path, records)
    assert peek_pairs(path) == form
    pairs = read_pairs(path)
    assert pairs.form == form and len(pairs.pairs) == len(records)
    assert [p.line for p in pairs.pairs] == list(range(1, len(records) + 1))


def test_strings_render_exactly_as_sft(tmp_path):
    pair = read_pairs(jsonl(tmp_path, STRING_PAIRS)).pairs[0]
    prompt, chosen, rejected = render_pair(pair)
    assert (prompt, prompt + chosen) == render_alpaca("Add 2 and 2.", "4")
    assert (prompt, prompt + rejected) == render_alpaca("Add 2 and 2.", "5")


def test_hh_prompt_is_the_shared_prefix_of_a_multi_turn_pair(tmp_path):
    pair = read_pairs(jsonl(tmp_path, [HH_MULTI])).pairs[0]
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" 4", " 22")
    assert pair.prompt + pair.chosen == HH_MULTI["chosen"]
    assert pair.prompt + pair.rejected == HH_MULTI["rejected"]


def test_hh_prefix_ends_at_an_assistant_mark_even_when_the_responses_share_a_start(tmp_path):
    record = {k: v.replace("It is", "It is exactly") for k, v in HH_SINGLE.items()}
    pair = read_pairs(jsonl(tmp_path, [record])).pairs[0]
    assert pair.prompt == "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert pair.chosen == " It is exactly 4."


def test_hh_single_turn_keeps_one_human_turn_and_renders_as_the_course(tmp_path):
    path = jsonl(tmp_path, [HH_SINGLE, HH_MULTI, HH_SINGLE])
    pairs = read_pairs(path, single_turn=True)
    assert len(pairs.pairs) == 2 and pairs.multi_turn == 1
    assert pairs.summary() == f"{path}: 2 pairs (Anthropic HH); skipped 1 multi-turn (single_turn)"
    prompt, chosen, rejected = render_pair(pairs.pairs[0])
    assert (prompt, prompt + chosen) == render_alpaca("What is 2+2?", "It is 4.")
    assert rejected == "It is 5."
    assert len(read_pairs(path).pairs) == 3  # without the option every pair stays
    assert error(jsonl(tmp_path, [HH_MULTI]), single_turn=True) == (
        f"{tmp_path / 'pairs.jsonl'}: no usable pair: all 1 skipped, 1 multi-turn (single_turn)"
    )


def test_gzip_and_json_list(tmp_path):
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in STRING_PAIRS).encode()))
    as_list = tmp_path / "pairs.json"
    as_list.write_text(json.dumps(STRING_PAIRS))
    expected = read_pairs(jsonl(tmp_path, STRING_PAIRS)).pairs
    assert read_pairs(gz).pairs == expected == read_pairs(as_list).pairs


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for records, name in ((STRING_PAIRS, "s"), ([CHAT_PAIR, CHAT_PAIR], "c"), ([HH_MULTI], "h")):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
        assert read_pairs(path).pairs == read_pairs(jsonl(tmp_path, records)).pairs


def test_parquet_messages_with_different_keys(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    untrained = {"role": "assistant", "content": "4", "train": False}
    record = {**CHAT_PAIR, "prompt": [USER, untrained, {"role": "user", "content": "Sure?"}]}
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([record]), path)
    assert read_pairs(path).pairs == read_pairs(jsonl(tmp_path, [record])).pairs


def test_parquet_bad_row_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([*STRING_PAIRS, {**STRING_PAIRS[0], "rejected": ""}]), path)
    assert error(path) == f"{path}:3: field 'rejected': empty"
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    assert error(not_parquet).startswith(f"{not_parquet}: cannot read as Parquet (")


def test_fields_map_the_files_names(tmp_path):
    records = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STRING_PAIRS]
    fields = parse_pair_fields("q=prompt,good=chosen,rejected=bad")
    assert fields == {"prompt": "q", "chosen": "good", "rejected": "bad"}
    path = jsonl(tmp_path, records)
    assert (
        read_pairs(path, fields).pairs == read_pairs(jsonl(tmp_path, STRING_PAIRS, "b.jsonl")).pairs
    )
    del records[1]["bad"]
    assert error(jsonl(tmp_path, records), fields=fields) == (
        f"{path}:2: field 'bad': missing (a pair needs a chosen and a rejected response)"
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"prompt": "p", "chosen": "c"},
            "field 'rejected': missing (a pair needs a chosen and a rejected response)",
        ),
        (
            {"prompt": "p", "rejected": "r"},
            "field 'chosen': missing (a pair needs a chosen and a rejected response)",
        ),
        ({"prompt": "p", "chosen": " ", "rejected": "r"}, "field 'chosen': empty"),
        (
            {"prompt": "p"},
            "field 'chosen': missing (a pair needs a chosen and a rejected response)",
        ),
        ({**CHAT_PAIR, "rejected": []}, "field 'rejected': empty"),
        (
            {"chosen": HH_SINGLE["chosen"]},
            "field 'rejected': missing (a pair needs a chosen and a rejected response)",
        ),
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: ",
                "rejected": "\n\nHuman: hi\n\nAssistant: yo",
            },
            "field 'chosen': empty (nothing after the last 'Assistant:')",
        ),
        (
            {"chosen": "4", "rejected": "5"},
            "field 'chosen': no shared prompt ending in '\\n\\nAssistant:': not an Anthropic HH pair",
        ),
    ],
)
def test_missing_or_empty_response(tmp_path, record, message):
    path = jsonl(tmp_path, [STRING_PAIRS[0] if "prompt" in record else HH_SINGLE, record])
    if isinstance(record.get("prompt"), list):
        path = jsonl(tmp_path, [CHAT_PAIR, record])
    assert error(path) == f"{path}:2: {message}"


def test_mixed_formats(tmp_path):
    path = jsonl(tmp_path, [*STRING_PAIRS, HH_SINGLE])
    assert error(path) == (
        f"{path}:3: this record is Anthropic HH, but the file's first record (line 1) is "
        "prompt/chosen/rejected strings: one format per file"
    )
    path = jsonl(tmp_path, [CHAT_PAIR, STRING_PAIRS[0]])
    assert (
        "this record is prompt/chosen/rejected strings, but the file's first record (line 1)"
        " is conversational pairs: one format per file" in error(path)
    )


def test_implicit_prompt_must_be_the_same_in_both(tmp_path):
    whole = {k: [*CHAT_PAIR["prompt"], *CHAT_PAIR[k]] for k in ("chosen", "rejected")}
    pair = read_pairs(jsonl(tmp_path, [whole])).pairs[0]
    assert pair == read_pairs(jsonl(tmp_path, [CHAT_PAIR], "b.jsonl")).pairs[0]
    other = {"role": "user", "content": "3+3?"}
    bad = {
        "chosen": whole["chosen"],
        "rejected": [CHAT_PAIR["prompt"][0], other, whole["rejected"][-1]],
    }
    path = jsonl(tmp_path, [whole, bad])
    assert error(path) == (
        f"{path}:2: field 'rejected': the prompt differs between chosen and rejected "
        "(message 1): a pair shares one prompt"
    )


def test_chosen_equal_to_rejected_is_counted_and_skipped(tmp_path):
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    path = jsonl(tmp_path, [STRING_PAIRS[0], same, same, STRING_PAIRS[1]])
    pairs = read_pairs(path)
    assert [p.line for p in pairs.pairs] == [1, 4] and pairs.identical == 2
    assert pairs.summary() == (
        f"{path}: 2 pairs (prompt/chosen/rejected strings); skipped 2 with chosen equal to rejected"
    )
    assert error(jsonl(tmp_path, [same, same])) == (
        f"{path}: no usable pair: all 2 skipped, 2 with chosen equal to rejected"
    )


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"prompt": "p", "response": "r"}, "prompt/response"),
        ({"instruction": "i", "output": "o"}, "Alpaca"),
        ({"messages": [USER, {"role": "assistant", "content": "4"}]}, "OpenAI messages"),
    ],
)
def test_sft_data_given_as_pairs(tmp_path, record, kind):
    path = jsonl(tmp_path, [record])
    assert error(path) == f"{path}:1: this file holds {kind} records: use --objective sft"


def test_a_first_record_of_neither_kind(tmp_path):
    path = jsonl(tmp_path, [{"question": "q", "answer": "a"}])
    assert error(path) == (
        f"{path}:1: cannot tell the pair format: expected keys prompt/chosen/rejected, or "
        "chosen/rejected (Anthropic HH), or a field mapping"
    )
    path = jsonl(tmp_path, [{"prompt": "p"}])
    assert error(path) == (
        f"{path}:1: field 'chosen': missing (a pair needs a chosen and a rejected response)"
    )


def test_pairs_given_as_sft_data(tmp_path):
    for records in (STRING_PAIRS, [CHAT_PAIR], [HH_SINGLE]):
        path = jsonl(tmp_path, records)
        with pytest.raises(DataError) as e:
            check_not_pairs(path)
        assert str(e.value) == f"{path}:1: this file holds preference pairs: use --objective dpo"
    check_not_pairs(jsonl(tmp_path, [{"prompt": "p", "response": "r"}]))  # SFT data passes


def test_nothing_is_written(tmp_path):
    path = jsonl(tmp_path, [STRING_PAIRS[0], {"prompt": "p"}])
    before = sorted(tmp_path.iterdir())
    error(path)
    assert sorted(tmp_path.iterdir()) == before


def prompt_untrained(pair: Pair) -> list[dict]:
    return [{**m, "train": False} for m in pair.prompt]


@pytest.fixture
def llama3_chatml(llama3_copy):
    """The Llama 3 tokenizer with sftune's shipped `--chat-template chatml`."""
    return set_chat_template(llama3_copy, "chatml")


def test_conversational_tokens_are_the_chat_templates_rendering(llama3_chatml, tmp_path):
    tok = llama3_chatml
    multi_turn = {
        "prompt": [
            USER,
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        "chosen": [{"role": "assistant", "content": "6"}],
        "rejected": [{"role": "assistant", "content": "33"}],
    }
    encoder = PairEncoder(tok)
    for pair in read_pairs(jsonl(tmp_path, [CHAT_PAIR, multi_turn])).pairs:
        tokens = encoder.encode(pair)
        for response, ids, mask in (
            (pair.chosen, tokens.chosen, tokens.chosen_mask),
            (pair.rejected, tokens.rejected, tokens.rejected_mask),
        ):
            text = tok.apply_chat_template([*pair.prompt, *response], tokenize=False)
            assert not text.endswith(tok.eos_token)  # so SFT's document appends the EOS id
            assert tokens.prompt + ids == tok(text)["input_ids"] + [tok.eos_token_id]
            prompt_text = tok.apply_chat_template(
                list(pair.prompt), tokenize=False, add_generation_prompt=True
            )
            assert tokens.prompt == tok(prompt_text)["input_ids"]
            # The mask is SFT's for that conversation, its prompt's turns not trained.
            sft = jsonl(tmp_path, [{"messages": [*prompt_untrained(pair), *response]}], "sft.jsonl")
            sft_tokens, _, sft_mask = build_stream(tok, sft, train_on="assistant")
            assert sft_tokens[0].tolist() == tokens.prompt + ids
            assert sft_mask[0].tolist() == [False] * len(tokens.prompt) + mask.tolist()
            assert mask.all()  # the assistant header ends the prompt: every response token trains
            prompt_part, chosen_text, rejected_text = render_pair(pair, tok)
            assert prompt_part == prompt_text
            assert prompt_part + (chosen_text if response is pair.chosen else rejected_text) == text


def test_render_pair_of_strings_needs_no_tokenizer():
    assert render_pair(Pair("Add 2 and 2.", "4", "5"))[0].endswith("### Response:\n")


def test_reading_pairs_imports_no_heavy_module(tmp_path):
    path = jsonl(tmp_path, [HH_SINGLE])
    code = (
        "import sys\nfrom sftune.data.preference import read_pairs\n"
        f"print(read_pairs({str(path)!r}).form)\n"
        "heavy = ('torch', 'numpy', 'transformers', 'pyarrow')\n"
        "assert not [m for m in heavy if m in sys.modules], sorted(sys.modules)\n"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(src)}
    )
    assert (done.returncode, done.stdout.strip()) == (0, "hh"), done.stderr


def test_parquet_rows_have_the_jsonl_limits(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    import sftune.data.preference as preference

    folder = tmp_path / "dir.parquet"
    folder.mkdir()
    assert "is a directory, not a data file" in error(folder)
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.Table.from_pylist([STRING_PAIRS[0], {**STRING_PAIRS[0], "chosen": "x" * 200}]), path
    )
    import sftune.data.formats as formats

    for module in (preference, formats):
        monkeypatch.setattr(module, "MAX_RECORD_BYTES", 100)
    assert error(path).startswith(
        f"{path}:2: this record is 252 bytes of JSON, over the limit of 100 bytes per record"
    )


@pytest.mark.parametrize("records", [STRING_PAIRS, [HH_SINGLE, HH_MULTI]])
def test_string_pair_tokens_are_sfts_documents(llama3_copy, tmp_path, records):
    tok = llama3_copy
    encoder = PairEncoder(tok)
    for pair in read_pairs(jsonl(tmp_path, records)).pairs:
        tokens = encoder.encode(pair)
        prompt_part, *responses = render_pair(pair)
        pairs_of = zip(
            responses,
            (tokens.chosen, tokens.rejected),
            (tokens.chosen_mask, tokens.rejected_mask),
            strict=True,
        )
        for response, ids, mask in pairs_of:
            sft = jsonl(
                tmp_path, [{"prompt": _instruction(prompt_part), "response": response}], "sft.jsonl"
            )
            sft_tokens, _, sft_mask = build_stream(tok, sft, train_on="assistant")
            assert sft_tokens[0].tolist() == tokens.prompt + ids
            assert sft_mask[0].tolist() == [False] * len(tokens.prompt) + mask.tolist()
            assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def _instruction(prompt_part: str) -> str:
    """The instruction inside an Alpaca prompt part."""
    head, tail = render_alpaca("\0", "")[0].split("\0")
    return prompt_part.removeprefix(head).removesuffix(tail)


def test_a_response_that_merges_with_the_prompt_is_tokenized_alone(llama3_copy):
    tok = llama3_copy
    pair = Pair("Add 2 and 2.", "\n4", "5")
    prompt_part = render_pair(pair)[0]
    assert (
        tok(prompt_part + "\n4")["input_ids"][: len(tok(prompt_part)["input_ids"])]
        != (tok(prompt_part)["input_ids"])
    )  # Llama 3 writes the two newlines as one token
    tokens = PairEncoder(tok).encode(pair)
    assert tokens.prompt == tok(prompt_part)["input_ids"]
    assert tokens.chosen == tok("\n4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tokens.chosen_mask.all()
    assert tokens.prompt + tokens.rejected == tok(prompt_part + "5")["input_ids"] + [
        tok.eos_token_id
    ]
