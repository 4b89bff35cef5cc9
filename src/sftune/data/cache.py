"""The on-disk cache of file-order token streams, so a data file is tokenized once.

Tokenizing a large SFT file takes minutes; a restart, a second rank or the next run with other
shuffle/holdout settings should not pay that again. An entry holds the stream of `tokenize.py`
(documents in file order) as .npy files that are memory-mapped when read, so every process on
a node shares one copy in the page cache:

    <cache dir>/<file name>-<key>/tokens.npy       int32, the stream
                                  doc_offsets.npy  int64, where each document starts, then L
                                  mask.npy         bool, trained labels (absent: all are)
                                  meta.json        source path, documents, tokens

The key hashes what changes the stream: the file's bytes, the tokenizer (its full backend
JSON, BOS/EOS, special tokens and chat template, `--chat-template`'s included, since it is set
on the tokenizer), the Alpaca template, the field mapping, the
`--train-on` mode (resolved: `auto` keys as what it became), the default system prompt and
`CACHE_VERSION` (bumped whenever the packing rule changes). Shuffle, holdout, `--packing
split|whole` and position ids are applied after loading, so one entry serves them all. Entries are written through
`sftune.files.atomic_dir`: a reader sees a complete entry or none, and of two processes
building the same entry the first to finish wins.

    >>> stream, from_cache = load_or_build(tok, Path("train.jsonl"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftune.data.formats import peek
from sftune.data.templates import resolve_train_on, template_fingerprint
from sftune.data.tokenize import build_stream
from sftune.errors import DataError
from sftune.files import atomic_dir
from sftune.paths import cache_root

# 2: a chat that ends with the EOS text is cut after it and gets no second EOS;
# a template's BOS string is stripped only when the tokenizer adds a real BOS.
# 3: --train-on (every assistant turn located by prefix rendering), ShareGPT, tools, system prompt.
CACHE_VERSION = 3


@dataclass
class PackedStream:
    """The file-order token stream: documents back to back, each (BOS) ... EOS.

    `doc_offsets[j]` is where document j starts (length documents + 1, the last entry is L);
    `mask[k]` is True when token k is trained as a label target; None when every token is.
    """

    tokens: np.ndarray  # int32, shape (L,)
    doc_offsets: np.ndarray  # int64, shape (documents + 1,)
    mask: np.ndarray | None  # bool, shape (L,)


def default_cache_dir() -> Path:
    """`<cache root>/packed`: `$SFTUNE_CACHE_DIR/packed`, else the user's cache dir for sftune."""
    return cache_root() / "packed"


def file_digest(path: Path) -> str:
    """blake2b of the file's bytes, read in 4 MiB blocks."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes the ids or the rendered text."""
    digest = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        type(tokenizer).__name__,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "special_tokens_map", None),  # what a chat template may read
    ]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def cache_key(
    tokenizer: Any,
    path: Path,
    fields: Mapping[str, str] | None,
    train_on: str | bool = "all",
    system_prompt: str | None = None,
) -> str:
    """The cache key of a file-order stream: contents, tokenizer, templates, fields, masking.

    `train_on` as `build_stream` takes it (a mode, `auto`, or the old `response_only` bool).
    """
    return content_key(
        CACHE_VERSION,
        tokenizer,
        path,
        fields,
        train_on=resolve_train_on(train_on, peek(path, fields)),
        system_prompt=system_prompt or None,
    )


def content_key(
    version: int, tokenizer: Any, path: Path, fields: Mapping[str, str] | None, **settings: Any
) -> str:
    """A hex key of what a file's tokens depend on: its bytes, the tokenizer, sftune's
    templates, the field mapping, a cache `version` and the reader's own `settings` (JSON
    values). The SFT stream's key and the preference pairs' (pair_dataset.py) are both this."""
    parts = {
        "version": version,
        "file": file_digest(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_fingerprint(),
        "fields": sorted((fields or {}).items()),
        **settings,
    }
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def load_or_build(
    tokenizer: Any,
    path: Path,
    fields: Mapping[str, str] | None = None,
    train_on: str | bool = "all",
    *,
    system_prompt: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[PackedStream, bool]:
    """The file-order stream of `path`, from the cache when present: (stream, from_cache)."""
    if not path.is_file():
        raise DataError(path, "no such file")
    settings = (fields, train_on, system_prompt)
    if not use_cache:
        tokens, lengths, mask = build_stream(tokenizer, path, *settings)
        return _in_memory(tokens, lengths, mask), False
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"{path.name}-{cache_key(tokenizer, path, *settings)}"
    if (entry / "meta.json").is_file():
        return _load_entry(entry), True
    tokens, lengths, mask = build_stream(tokenizer, path, *settings)
    _write_entry(entry, tokens, lengths, mask, source=str(path))
    return _load_entry(entry), False


def _in_memory(
    tokens: list[np.ndarray], lengths: np.ndarray, mask: list[np.ndarray] | None
) -> PackedStream:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return PackedStream(
        np.concatenate(tokens), offsets, None if mask is None else np.concatenate(mask)
    )


def _load_entry(entry: Path) -> PackedStream:
    mask_file = entry / "mask.npy"
    return PackedStream(
        tokens=np.load(entry / "tokens.npy", mmap_mode="r"),
        doc_offsets=np.load(entry / "doc_offsets.npy"),
        mask=np.load(mask_file, mmap_mode="r") if mask_file.is_file() else None,
    )


def _write_entry(
    entry: Path,
    tokens: list[np.ndarray],
    lengths: np.ndarray,
    mask: list[np.ndarray] | None,
    source: str,
) -> None:
    """Write the entry atomically; a concurrent writer's finished copy is kept (replace=False)."""
    with atomic_dir(entry, replace=False) as tmp:
        _save_chunks(tmp / "tokens.npy", tokens, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(tmp / "doc_offsets.npy", offsets)
        if mask is not None:
            _save_chunks(tmp / "mask.npy", mask, np.bool_)
        meta = {"source": source, "documents": len(lengths), "tokens": int(offsets[-1])}
        (tmp / "meta.json").write_text(json.dumps(meta))


def _save_chunks(path: Path, chunks: list[np.ndarray], dtype: type) -> None:
    """One .npy file from chunks, without concatenating them in memory first."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": (sum(len(c) for c in chunks),),
    }
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(chunk.astype(dtype, copy=False).tobytes())
