"""Show packed documents with their trained tokens marked, to check masking before training.

    sftune prepare chats.jsonl --tokenizer smollm2-135m --seq-length 512 --show 2

A trained token is one the loss teaches the model to predict (its label is kept). On a terminal
trained text is green; otherwise (a pipe, a file, or NO_COLOR set) it is wrapped in [[ ]]:

    --- document 1 (record 1): 37 tokens, 5 trained ---
    <|im_start|>user
    hi<|im_end|>
    <|im_start|>assistant
    [[yo<|im_end|>]]
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

COLOUR = ("\033[1;32m", "\033[0m")
BRACKETS = ("[[", "]]")


def show_documents(dataset: Any, tokenizer: Any, count: int, colour: bool = False) -> str:
    """The first `count` documents of a `PackedSFTDataset`'s stream, trained tokens marked."""
    starts, ends = dataset.doc_starts.tolist(), dataset.doc_ends.tolist()  # no padding between
    out = []
    for j in range(min(max(count, 0), len(starts))):
        lo, hi = starts[j], ends[j]
        mask = None if dataset.mask is None else np.asarray(dataset.mask[lo:hi])
        trained = hi - lo if mask is None else int(mask.sum())
        record = int(dataset.stream_documents[j]) + 1
        out.append(
            f"--- document {j + 1} (record {record}): {hi - lo} tokens, {trained} trained ---"
        )
        out.append(mark_trained(tokenizer, dataset.tokens[lo:hi], mask, colour))
    return "\n".join(out)


def mark_trained(tokenizer: Any, tokens: Any, mask: np.ndarray | None, colour: bool) -> str:
    """The decoded tokens, each run of trained ones between markers (colour or brackets).

    Runs are cut from decodings of growing prefixes, so the text reads exactly as the whole
    document decodes; a tokenizer whose prefix decodings are not prefixes of each other
    (a decoder that strips) falls back to decoding each run on its own.
    """
    ids = [int(t) for t in tokens]
    flags = [True] * len(ids) if mask is None else [bool(m) for m in mask]
    start_mark, end_mark = COLOUR if colour else BRACKETS
    pieces, done, start = [], "", 0
    for trained, run in itertools.groupby(flags):
        end = start + len(list(run))
        text = _decode(tokenizer, ids[:end])
        piece = text[len(done) :] if text.startswith(done) else _decode(tokenizer, ids[start:end])
        done, start = text, end
        pieces.append(f"{start_mark}{piece}{end_mark}" if trained else piece)
    return "".join(pieces)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
