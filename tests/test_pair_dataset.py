"""The preference-pair data kind (sftune.data.pair_dataset): cache, split, shuffle, batches,
reference lookup and every bad input's one line, end to end through `PackedPairDataset`.

The packed layout and the log-probs of packed rows against separate sequences are
tests/test_pair_packing.py's; the readers' cases are tests/test_preference_data.py's.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sftune.data.chat_templates import set_chat_template
from sftune.data.pair_dataset import PackedPairDataset, require_pairs
from sftune.data.pairs import pack_pairs
from sftune.data.preference import HH, Pair, PairEncoder, check_not_pairs, read_pairs
from sftune.data.tokenize import build_stream
from sftune.errors import DataError, SftuneError
from tiny import byte_tokenizer

BATCH_KEYS = {"input_ids", "position_ids", "segment", "source", "target", "pair", "side"}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def jsonl(tmp_path: Path, records, name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def string_pairs(n: int) -> list[dict]:
    """n distinct pairs of varied lengths."""
    return [
        {
            "prompt": f"Add {i} and {i}." + " please" * (i % 3),
            "chosen": f"{2 * i}",
            "rejected": f"{i}{i}!",
        }
        for i in range(n)
    ]


def dataset(tok, path, seq_length=512, shuffle=False, **kwargs) -> PackedPairDataset:
    return PackedPairDataset(tok, path, seq_length, shuffle, verbose=False, **kwargs)


def all_rows(ds) -> dict[str, torch.Tensor]:
    return ds.get_batch(np.arange(len(ds)))


def side_ids(batch, local: int, side: int) -> list[int]:
    """The scored target ids of a batch's local pair on one side (0 chosen, 1 rejected)."""
    pick = (batch["pair"] == local) & (batch["side"] == side)
    return batch["target"][pick].tolist()


def test_batches_hold_each_pairs_tokens_under_its_dataset_index(tok, tmp_path):
    records = string_pairs(6)
    ds = dataset(tok, jsonl(tmp_path, records))
    encoded = [PairEncoder(tok).encode(p) for p in read_pairs(ds.path).pairs]
    assert ds.format == "strings" and ds.num_pairs == 6 and len(ds) == ds.stats["rows"]
    assert ds.num_trained_tokens == sum(len(t.chosen) + len(t.rejected) for t in encoded)
    seen = []
    for row in range(len(ds)):
        b = ds.get_batch([row])
        assert set(b) == BATCH_KEYS | {"pair_ids"}  # no ref_logps before set_reference
        assert all(v.dtype == torch.int64 for v in b.values())
        assert b["input_ids"].shape == b["position_ids"].shape == b["segment"].shape == (1, 512)
        n = len(b["pair_ids"])
        assert b["pair"].unique().tolist() == list(range(n))
        for local, j in enumerate(b["pair_ids"].tolist()):
            assert side_ids(b, local, 0) == encoded[j].chosen
            assert side_ids(b, local, 1) == encoded[j].rejected
            tokens = b["input_ids"][0][b["segment"][0] // 3 == b["segment"][0][0] // 3 + local]
            assert tokens.tolist() == encoded[j].prompt + encoded[j].chosen + encoded[j].rejected
        seen += b["pair_ids"].tolist()
    assert seen == list(range(6))  # every pair once, in order (no shuffle)
    both = ds.get_batch([0, len(ds) - 1])  # a batch of two rows: local pairs 0..n-1 over both
    assert both["input_ids"].shape == (2, 512)
    assert both["pair_ids"].tolist() == sorted(set(both["pair_ids"].tolist()))


def test_cache_hit_returns_identical_arrays_and_holds_no_pickle(tok, tmp_path, capsys):
    path = jsonl(tmp_path, string_pairs(8))
    first = PackedPairDataset(tok, path, 512, True, seed=3)
    second = PackedPairDataset(tok, path, 512, True, seed=3)
    out = capsys.readouterr().out.splitlines()
    assert "built in" in out[0] and "loaded from cache in" in out[1] and len(out) == 2
    assert first.cache_key == second.cache_key and first.summary.startswith("sftune: pairs.jsonl")
    a, b = all_rows(first), all_rows(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(first.pair_indices, second.pair_indices)
    entries = list((Path(os.environ["SFTUNE_CACHE_DIR"]) / "pairs").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("pairs.jsonl-")
    files = sorted(p.name for p in entries[0].iterdir())
    assert files == ["lines.npy", "meta.json", "scored.npy", "sizes.npy", "tokens.npy"]
    for name in files[:1] + files[2:]:
        np.load(entries[0] / name, allow_pickle=False)  # plain arrays: never an object array


def test_cache_key_covers_what_the_rows_depend_on(tok, tmp_path, capsys):
    path = jsonl(tmp_path, string_pairs(8))
    base = dict(seq_length=512, shuffle=False)

    def key(tokenizer=tok, **changes):
        return dataset(tokenizer, path, **{**base, **changes}).cache_key

    keys = {
        "base": key(),
        "seq_length": key(seq_length=600),
        "truncation": key(truncation="keep-end"),
        "shuffle": key(shuffle=True),
        "shuffle seed": key(shuffle=True, seed=1),
        "holdout": key(holdout_fraction=0.25),
        "held out": key(holdout_fraction=0.25, holdout=True),
        "holdout seed": key(holdout_fraction=0.25, seed=1),
        "single_turn": key(single_turn=True),
        "fields": key(fields="prompt=prompt"),
        "template": key(set_chat_template(byte_tokenizer(), "chatml")),
    }
    assert len(set(keys.values())) == len(keys), keys
    assert key(seed=5) == keys["base"]  # a seed that draws nothing does not change the rows
    path.write_text(path.read_text().replace("Add 0", "Add 00"))
    assert key() != keys["base"]


def test_holdout_split_is_disjoint_complementary_and_deterministic(tok, tmp_path):
    path = jsonl(tmp_path, string_pairs(20))

    def split(holdout, seed=0, shuffle=False):
        ds = dataset(tok, path, shuffle=shuffle, seed=seed, holdout_fraction=0.25, holdout=holdout)
        return ds, set(ds.pair_indices.tolist())

    held_ds, held = split(True)
    kept_ds, kept = split(False)
    assert len(held) == 5 and held_ds.num_pairs == 5 and kept_ds.num_pairs == 15
    assert held.isdisjoint(kept) and held | kept == set(range(20))
    assert split(True)[1] == held and split(False, shuffle=True)[1] == kept  # shuffle: same set
    assert split(True, seed=1)[1] != held
    assert "held out 5 of 20 pairs (0.25)" in held_ds.summary
    assert "kept after holding out 15 of 20 pairs" in kept_ds.summary
    assert held_ds.pair_lines.tolist() == [i + 1 for i in held_ds.pair_indices]
    lines = {p.line for p in held_ds.sample_records(10)}  # a held-out set samples held-out pairs
    assert lines == {i + 1 for i in held}
    with pytest.raises(DataError, match=r"1 usable pair\(s\) cannot be split by --val-fraction"):
        dataset(tok, jsonl(tmp_path, string_pairs(1), "one.jsonl"), holdout_fraction=0.5)


def test_shuffle_is_seeded_and_pair_ids_follow_the_packing_order(tok, tmp_path):
    path = jsonl(tmp_path, string_pairs(12))
    ds = dataset(tok, path, shuffle=True, seed=0)
    order = ds.pair_indices.tolist()
    assert sorted(order) != order and sorted(order) == list(range(12))
    assert dataset(tok, path, shuffle=True, seed=0).pair_indices.tolist() == order
    assert dataset(tok, path, shuffle=True, seed=1).pair_indices.tolist() != order
    encoded = [PairEncoder(tok).encode(p) for p in read_pairs(path).pairs]
    b = all_rows(ds)
    assert b["pair_ids"].tolist() == list(range(12))  # dataset index = packing order
    for local, i in enumerate(b["pair_ids"].tolist()):
        assert side_ids(b, local, 0) == encoded[order[i]].chosen  # file pair order[i]


def test_identical_pairs_are_counted_skipped_and_said(tok, tmp_path):
    records = string_pairs(3)
    records.insert(1, {"prompt": "Same?", "chosen": "yes", "rejected": "yes"})
    ds = dataset(tok, jsonl(tmp_path, records))
    assert ds.num_pairs == 3 and ds.stats["identical"] == 1
    assert "; skipped 1 with chosen equal to rejected:" in ds.summary
    # HH texts that differ only where the rendering strips them encode the same: skipped too.
    hh = "\n\nHuman: 2+2?\n\nAssistant:"
    hh_path = jsonl(
        tmp_path,
        [
            {"chosen": hh + " 4", "rejected": hh + " 5"},
            {"chosen": hh + " 4", "rejected": hh + " 4 "},
        ],
        "hh.jsonl",
    )
    hh_ds = dataset(tok, hh_path)
    assert hh_ds.format == "hh" and hh_ds.num_pairs == 1 and hh_ds.stats["identical"] == 1
    assert "skipped 1 with chosen equal to rejected" in hh_ds.summary
    same = jsonl(tmp_path, [{"chosen": hh + " 4", "rejected": hh + " 4 "}] * 2, "same.jsonl")
    with pytest.raises(DataError) as e:
        dataset(tok, same)
    assert str(e.value) == f"{same}: no usable pair: all 2 skipped, 2 with chosen equal to rejected"


CHAT = {
    "prompt": [{"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}
IMPLICIT = {
    "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "rejected": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}],
}
GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("records", "where", "problem"),
    [
        ([GOOD, {"prompt": "p", "chosen": "a"}], ":2: field 'rejected': ", "missing"),
        ([{"prompt": "p", "chosen": " ", "rejected": "b"}], ":1: field 'chosen': ", "empty"),
        ([GOOD, CHAT], ":2: ", "this record is conversational pairs, but the file's first"),
        ([IMPLICIT], ":1: field 'rejected': ", "the prompt differs between chosen and rejected"),
        ([GOOD, {**GOOD, "prompt": "p" * 200}], ":2: ", "a pair of 345 tokens (prompt 341"),
        ([{"q": "p", "good": "a"}], ":1: ", "cannot tell the pair format"),
    ],
)
def test_bad_records_are_one_line_naming_file_line_and_field(
    tok, tmp_path, records, where, problem
):
    chat_tok = set_chat_template(byte_tokenizer(), "chatml")
    path = jsonl(tmp_path, records)
    cache = Path(os.environ["SFTUNE_CACHE_DIR"])
    before = sorted(tmp_path.rglob("*")), sorted(cache.rglob("*"))
    with pytest.raises(DataError) as e:
        dataset(chat_tok, path, seq_length=256)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}{where}{problem}"), str(e.value)
    assert sorted(tmp_path.rglob("*")) == before[0]  # nothing of the user's touched
    # A reader's error leaves no cache entry; a pair too long for the row is refused after
    # its file's (valid) token ids were cached, whole, for a rerun with --truncation.
    written = [p.relative_to(cache).parts for p in sorted(cache.rglob("*"))]
    too_long = "a pair of" in problem
    assert (written != []) == too_long and not any(
        part.startswith(".") for w in written for part in w
    )


def test_sft_data_for_a_preference_objective_and_the_reverse(tok, tmp_path):
    sft = jsonl(tmp_path, [{"prompt": "Add 2 and 2.", "response": "4"}], "sft.jsonl")
    message = (
        f"`--objective dpo` needs preference pairs (prompt/chosen/rejected): {sft}:1 looks like "
        "SFT data (prompt/response records); use --objective sft, or a file of pairs"
    )
    for call in (lambda: require_pairs(sft), lambda: dataset(tok, sft)):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value) == message and (e.value.path, e.value.line) == (str(sft), 1)
    chats = jsonl(tmp_path, [{"messages": CHAT["prompt"] + CHAT["chosen"]}], "chat.jsonl")
    with pytest.raises(DataError, match=r"^`--objective ipo` needs .* \(OpenAI messages records\)"):
        require_pairs(chats, objective="ipo")
    pairs = jsonl(tmp_path, [GOOD])
    assert require_pairs(pairs) == "strings"
    with pytest.raises(DataError, match="preference pairs: use --objective dpo$"):
        check_not_pairs(pairs)


def test_truncation_cuts_and_counts_in_the_summary(tok, tmp_path):
    long = {"prompt": "Explain " * 4, "chosen": "yes " * 10, "rejected": "no " * 12}
    path = jsonl(tmp_path, [GOOD, long])  # 146 and 251 byte tokens (long: 173 + 41 + 37)
    full = dataset(tok, path, seq_length=256)
    with pytest.raises(DataError, match=r":2: a pair of 251 .* use --truncation keep-start or"):
        dataset(tok, path, seq_length=240)
    # keep-start at 240 cuts 11 response tokens; keep-end at 200 cuts 51 prompt tokens only.
    for mode, m, cut, lost in (
        ("keep-start", 240, "prompt 0, responses 1", 11),
        ("keep-end", 200, "prompt 1, responses 0", 0),
    ):
        ds = dataset(tok, path, seq_length=m, truncation=mode)
        assert ds.stats["truncated"] == 1 and f"cut to fit: 1 ({cut})" in ds.summary
        assert ds.num_trained_tokens == full.num_trained_tokens - lost
        assert ds.num_trained_tokens == len(all_rows(ds)["target"])


def test_reference_logps_are_looked_up_by_pair_ids(tok, tmp_path):
    ds = dataset(tok, jsonl(tmp_path, string_pairs(9)), seq_length=512, shuffle=True)
    logps = np.stack([-np.arange(9.0), -100 - np.arange(9.0)], axis=1)
    ds.set_reference(logps)
    logps[:] = 0  # the dataset holds its own copy
    for row in range(len(ds)):
        b = ds.get_batch([row])
        ids = b["pair_ids"].numpy()
        assert b["ref_logps"].dtype == torch.float64
        assert b["ref_logps"].tolist() == np.stack([-ids, -100.0 - ids], axis=1).tolist()
    with pytest.raises(SftuneError, match=r"shape \(9,\), expected \(9, 2\)"):
        ds.set_reference(np.zeros(9))
    bad = np.zeros((9, 2))
    bad[4, 1] = np.nan
    with pytest.raises(SftuneError, match=r"pair 4 \(line \d+\) is not finite"):
        ds.set_reference(bad)


def test_parquet_gives_the_jsonl_batches(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = string_pairs(5)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    from_parquet, from_jsonl = dataset(tok, path), dataset(tok, jsonl(tmp_path, records))
    a, b = all_rows(from_parquet), all_rows(from_jsonl)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        from_parquet.format == "strings"
        and "pairs.parquet: prompt/chosen/rejected strings (detected)" in from_parquet.summary
    )
    assert [p.line for p in from_parquet.sample_records(2)] == [1, 3]


def test_fields_map_the_files_names(tok, tmp_path):
    records = string_pairs(4)
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in records]
    path = jsonl(tmp_path, renamed, "renamed.jsonl")
    reference = all_rows(dataset(tok, jsonl(tmp_path, records)))
    for fields in (
        "q=prompt,good=chosen,bad=rejected",
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ):
        ds = dataset(tok, path, fields=fields)
        assert "(--fields)" in ds.summary
        assert all(torch.equal(all_rows(ds)[k], reference[k]) for k in reference)
        assert ds.sample_records(1)[0].prompt == records[0]["prompt"]


def test_a_chat_response_is_sfts_conversation_and_only_its_assistant_turns_score(tmp_path):
    """A response of several turns: the row holds SFT's document of the whole conversation;
    the user turn inside the response is context, not scored."""
    chat_tok = set_chat_template(byte_tokenizer(), "chatml")
    chosen = [
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes"},
    ]
    path = jsonl(tmp_path, [{**CHAT, "chosen": chosen}])
    ds = dataset(chat_tok, path, seq_length=256)
    b = all_rows(ds)
    for side, response in ((0, chosen), (1, CHAT["rejected"])):
        untrained = [{**m, "train": False} for m in CHAT["prompt"]]
        sft = jsonl(tmp_path, [{"messages": untrained + response}], "sft.jsonl")
        tokens, _, mask = build_stream(chat_tok, sft, train_on="assistant")
        tokens, mask = tokens[0], mask[0]
        segment = b["segment"][0]
        in_row = b["input_ids"][0][(segment == 0) | (segment == 1 + side)]
        assert in_row.tolist() == tokens.tolist()  # prompt + response = SFT's document
        assert side_ids(b, 0, side) == tokens[mask].tolist()  # scored = SFT's trained labels
    assert "Sure?" in chat_tok.decode(b["input_ids"][0][b["segment"][0] == 1])
    assert "Sure?" not in chat_tok.decode(side_ids(b, 0, 0))


def test_pack_pairs_masks_leave_untrained_tokens_unscored():
    ids = lambda *t: np.array(t)  # noqa: E731
    packed = pack_pairs(
        [ids(1, 2)],
        [ids(3, 4, 5)],
        [ids(6, 7)],
        8,
        pad_id=0,
        chosen_mask=[ids(True, False, True)],
        rejected_mask=[ids(True, True)],
    )
    assert packed.source[0].tolist() == [-1, -1, 1, -1, 3, 1, 5, -1]
    with pytest.raises(DataError, match=r"p.jsonl:4: the rejected response has no trained token"):
        pack_pairs(
            [ids(1, 2)],
            [ids(3, 4)],
            [ids(6, 7, 8)],
            5,
            pad_id=0,
            truncation="keep-start",
            chosen_mask=[ids(True, True)],
            rejected_mask=[ids(False, False, True)],
            path="p.jsonl",
            lines=[4],
        )


def test_sample_records_are_spread_over_the_set(tok, tmp_path):
    records = string_pairs(10)
    ds = dataset(tok, jsonl(tmp_path, records), shuffle=True)
    picked = ds.sample_records(3)
    assert [p.line for p in picked] == [1, 4, 7]  # file order, whatever the shuffle
    assert [p.chosen for p in picked] == [records[i]["chosen"] for i in (0, 3, 6)]
    assert len(ds.sample_records(50)) == 10 and ds.sample_records(0) == []


def test_a_batch_encodes_each_pair_as_alone(llama3_copy):
    """One tokenizer call for many pairs gives each pair's own ids, the fallback included (a
    response starting with "\\n\\n" merges with the prompt's last token in Llama 3)."""
    pairs = [
        Pair("Add 2 and 2.", "4", "5"),
        Pair("Say hi.", "\n\nHi!", "Bye."),  # the chosen side is tokenized alone
        Pair("\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5", form=HH),
    ]
    encoder = PairEncoder(llama3_copy)
    batched = encoder.encode_batch(pairs)

    def plain(t):
        return [x.tolist() if isinstance(x, np.ndarray) else x for x in t]

    assert [plain(t) for t in batched] == [plain(encoder.encode(p)) for p in pairs]
    assert batched[1].chosen == llama3_copy("\n\nHi!", add_special_tokens=False)["input_ids"] + [
        llama3_copy.eos_token_id
    ]


def test_a_damaged_cache_entry_is_one_line_naming_it(tok, tmp_path):
    path = jsonl(tmp_path, string_pairs(3))
    dataset(tok, path)
    (entry,) = (Path(os.environ["SFTUNE_CACHE_DIR"]) / "pairs").iterdir()
    np.save(entry / "sizes.npy", np.load(entry / "sizes.npy")[:2])
    with pytest.raises(SftuneError, match=r"entry .* is damaged \(its arrays disagree") as e:
        dataset(tok, path)
    assert str(entry) in str(e.value) and "\n" not in str(e.value)
    (entry / "tokens.npy").write_bytes(b"not numpy")
    with pytest.raises(SftuneError, match=r"is damaged \(ValueError: .*\): delete it and rerun$"):
        dataset(tok, path)


def test_gzip_pairs(tok, tmp_path):
    records = string_pairs(3)
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    a, b = all_rows(dataset(tok, gz)), all_rows(dataset(tok, jsonl(tmp_path, records)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_logps_are_each_sides_sft_document_logps_fp64(tmp_path):
    """The dataset's batch, fed as the trainer will (sdpa bool mask from `segment`, the
    positions), gives per pair and side the summed log-probs of SFT's own document of that
    conversation over SFT's trained labels, a multi-turn response's user turn unscored."""
    from sftune.data.pairs import attention_mask_4d, sum_by_pair
    from tiny import build_tiny_model

    chat_tok = set_chat_template(byte_tokenizer(), "chatml")
    turns = [
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes"},
    ]
    records = [
        {**CHAT, "chosen": turns},
        {**CHAT, "prompt": [{"role": "user", "content": "3+3?"}]},
        {**CHAT, "rejected": [{"role": "assistant", "content": "Five, or so."}]},
    ]
    ds = dataset(chat_tok, jsonl(tmp_path, records), seq_length=256, shuffle=True, seed=2)
    assert len(ds) >= 2  # pairs share rows, and span more than one
    model = build_tiny_model(len(chat_tok), dtype=torch.float64, seed=1).eval()
    b = all_rows(ds)
    with torch.no_grad():
        logits = model(
            input_ids=b["input_ids"],
            position_ids=b["position_ids"],
            attention_mask=attention_mask_4d(b["segment"]),
        ).logits
        token_logps = logits.log_softmax(-1).flatten(0, 1)[b["source"], b["target"]]
        got = sum_by_pair(token_logps, b["pair"], b["side"], len(b["pair_ids"]))
        for local, i in enumerate(b["pair_ids"].tolist()):
            record = records[int(ds.pair_indices[i])]
            for side, key in enumerate(("chosen", "rejected")):
                prompt = [{**m, "train": False} for m in record["prompt"]]
                sft = jsonl(tmp_path, [{"messages": prompt + record[key]}], "sft.jsonl")
                tokens, _, mask = build_stream(chat_tok, sft, train_on="assistant")
                seq = torch.from_numpy(tokens[0].astype(np.int64))
                logp = model(input_ids=seq[None]).logits[0].log_softmax(-1)
                at = torch.from_numpy(np.flatnonzero(mask[0][1:]))  # label k + 1 from output k
                expected = logp[at, seq[at + 1]].sum()
                torch.testing.assert_close(got[local, side], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["pair_dataset", "pairs", "preference"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"sftune.data.{name}")
    assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
