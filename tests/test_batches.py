"""iterate_batches: shapes, length, every item once, the short last batch, collate."""

from __future__ import annotations

import pytest
import torch

from sftune.data import PackedSFTDataset, collate, iterate_batches


@pytest.fixture(scope="module")
def dataset(llama3_tokenizer, shared) -> PackedSFTDataset:
    path = shared / "fixtures/cs336/sft_sample.jsonl"
    return PackedSFTDataset(llama3_tokenizer, path, 32, False, position_ids=True, verbose=False)


def item_keys(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in batch["input_ids"]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_shapes_len_and_each_item_once(dataset, shuffle):
    batches = iterate_batches(dataset, batch_size=8, shuffle=shuffle, seed=0)
    assert len(batches) == 10  # 75 items
    seen = []
    for n, batch in enumerate(batches):
        rows = 8 if n < 9 else 3  # the last batch is smaller
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        for value in batch.values():
            assert value.shape == (rows, 32) and value.dtype == torch.long
        seen += item_keys(batch)
    assert sorted(seen) == sorted(tuple(dataset[i]["input_ids"].tolist()) for i in range(75))
    assert len(set(seen)) == 75


def test_batches_equal_stacked_items(dataset):
    batch = next(iter(iterate_batches(dataset, batch_size=5, shuffle=False)))
    expected = collate([dataset[i] for i in range(5)])
    assert batch.keys() == expected.keys()
    for key in batch:
        assert torch.equal(batch[key], expected[key])


def test_shuffle_is_seeded(dataset):
    def order(seed):
        return [k for b in iterate_batches(dataset, 16, True, seed=seed) for k in item_keys(b)]

    plain = [k for b in iterate_batches(dataset, 16, False) for k in item_keys(b)]
    assert order(1) == order(1) != order(2)
    assert order(1) != plain


def test_plain_map_style_dataset_goes_through_collate():
    items = [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), -i)} for i in range(5)]
    batches = list(iterate_batches(items, batch_size=2, shuffle=False))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0]["labels"].shape == (2, 4)


def test_bad_batch_size(dataset):
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(dataset, 0, False)
