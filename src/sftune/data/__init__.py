"""Packed SFT data: read records, render templates, pack tokens, iterate batches.

>>> from sftune.data import PackedSFTDataset, iterate_batches  # doctest: +SKIP
>>> ds = PackedSFTDataset(tokenizer, "train.jsonl", seq_length=512, shuffle=True)  # doctest: +SKIP
>>> for batch in iterate_batches(ds, batch_size=8, shuffle=True, seed=0): ...  # doctest: +SKIP

The modules, in the order a file goes through them:

    formats.py    read and validate records; `peek` checks a file's first record   stdlib only
    chat.py       a chat record as OpenAI messages: roles, tool calls, turn flags   stdlib only
    chat_templates.py  the shipped --chat-template ones (chatml, llama3); read FILE  stdlib only
    limits.py     time and size limits on rendering a chat template                stdlib only
    preference.py preference pairs (3 forms; jsonl, gz, Parquet) -> token ids        stdlib only
    templates.py  render a record and find its trained characters (`--train-on`)   stdlib only
    tokenize.py   encode rendered documents into one file-order token stream        numpy
    cache.py      keep that stream on disk, keyed by file, tokenizer and settings   numpy
    packing.py    PackedSFTDataset: select, shuffle and window the stream           numpy, torch
    pairs.py      pack token-id pairs as prompt | chosen | rejected, the masks      numpy
    pair_dataset.py  PackedPairDataset: pairs cached, split, shuffled and packed    numpy, torch
    batches.py    `iterate_batches`: one epoch for your own loop (the course's API) numpy, torch
    sampler.py    `StepSampler`: the trainer's resumable, rank-sharded step order  numpy
    show.py       `sftune prepare --show`: documents with trained tokens marked     numpy
    demo.py       the generated demo dataset                                        stdlib only
    constants.py  IGNORE_INDEX, shared with the loss                                no imports

There are two ways to batch a packed dataset, on purpose: `iterate_batches` serves every item
once per call and holds no state (write your own loop around it); `StepSampler` is what
`sftune train` uses: it splits each optimizer step's global batch across ranks and saves its
position in checkpoints, so a run resumes exactly where it stopped.

Names are imported on first use (PEP 562), so `import sftune.data.formats` (what the CLI uses
to check a data file early) loads neither torch, numpy nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "IGNORE_INDEX": "constants",
    "Record": "formats",
    "detect_format": "formats",
    "iter_records": "formats",
    "parse_fields": "formats",
    "peek": "formats",
    "read_records": "formats",
    "ALPACA_TEMPLATE": "templates",
    "DocumentRenderer": "templates",
    "render_alpaca": "templates",
    "render_chat": "templates",
    "render_record": "templates",
    "DocumentEncoder": "tokenize",
    "build_stream": "tokenize",
    "PackedStream": "cache",
    "cache_key": "cache",
    "default_cache_dir": "cache",
    "load_or_build": "cache",
    "PackStats": "packing",
    "PackedSFTDataset": "packing",
    "PackedPairDataset": "pair_dataset",
    "require_pairs": "preference",
    "select_documents": "packing",
    "EpochBatches": "batches",
    "collate": "batches",
    "iterate_batches": "batches",
    "StepSampler": "sampler",
    "show_documents": "show",
    "ensure_demo_dataset": "demo",
    "write_demo_dataset": "demo",
}

__all__ = [  # the keys of _EXPORTS (a test checks they agree)
    "ALPACA_TEMPLATE",
    "DocumentEncoder",
    "DocumentRenderer",
    "EpochBatches",
    "IGNORE_INDEX",
    "PackStats",
    "PackedPairDataset",
    "PackedSFTDataset",
    "PackedStream",
    "Record",
    "StepSampler",
    "build_stream",
    "cache_key",
    "collate",
    "default_cache_dir",
    "detect_format",
    "ensure_demo_dataset",
    "iter_records",
    "iterate_batches",
    "load_or_build",
    "parse_fields",
    "peek",
    "read_records",
    "render_alpaca",
    "render_chat",
    "render_record",
    "require_pairs",
    "select_documents",
    "show_documents",
    "write_demo_dataset",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from sftune.data.batches import EpochBatches, collate, iterate_batches
    from sftune.data.cache import PackedStream, cache_key, default_cache_dir, load_or_build
    from sftune.data.constants import IGNORE_INDEX
    from sftune.data.demo import ensure_demo_dataset, write_demo_dataset
    from sftune.data.formats import (
        Record,
        detect_format,
        iter_records,
        parse_fields,
        peek,
        read_records,
    )
    from sftune.data.packing import PackedSFTDataset, PackStats, select_documents
    from sftune.data.pair_dataset import PackedPairDataset
    from sftune.data.preference import require_pairs
    from sftune.data.sampler import StepSampler
    from sftune.data.show import show_documents
    from sftune.data.templates import (
        ALPACA_TEMPLATE,
        DocumentRenderer,
        render_alpaca,
        render_chat,
        render_record,
    )
    from sftune.data.tokenize import DocumentEncoder, build_stream
