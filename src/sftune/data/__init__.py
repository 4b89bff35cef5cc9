"""Packed SFT data: read records, render templates, pack tokens, iterate batches.

>>> from sftune.data import PackedSFTDataset, iterate_batches  # doctest: +SKIP
>>> ds = PackedSFTDataset(tokenizer, "train.jsonl", seq_length=512, shuffle=True)  # doctest: +SKIP
>>> for batch in iterate_batches(ds, batch_size=8, shuffle=True, seed=0): ...  # doctest: +SKIP
"""

from sftune.data.batches import EpochBatches, collate, iterate_batches
from sftune.data.formats import Record, detect_format, iter_records, read_records
from sftune.data.packing import (
    IGNORE_INDEX,
    PackedSFTDataset,
    PackedStream,
    PackStats,
    default_cache_dir,
    select_documents,
)
from sftune.data.templates import (
    ALPACA_TEMPLATE,
    render_alpaca,
    render_chat,
    render_record,
)

__all__ = [
    "ALPACA_TEMPLATE",
    "IGNORE_INDEX",
    "EpochBatches",
    "PackStats",
    "PackedSFTDataset",
    "PackedStream",
    "Record",
    "collate",
    "default_cache_dir",
    "detect_format",
    "iter_records",
    "iterate_batches",
    "read_records",
    "render_alpaca",
    "render_chat",
    "render_record",
    "select_documents",
]
