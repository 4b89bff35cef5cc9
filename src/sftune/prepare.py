"""`sftune prepare`: tokenize, pack and cache a dataset ahead of training, and print its stats.

    sftune prepare ../shared/data/gsm8k/train.jsonl --tokenizer /path/to/tokenizer_dir \\
        --seq-length 512 --fields question=prompt,answer=response

Training with the same file, tokenizer, field mapping and masking then loads the packed
stream from the cache (`$SFTUNE_CACHE_DIR/packed`) instead of tokenizing again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sftune.data.formats import parse_fields
from sftune.errors import DataError, SftuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `sftune prepare`; sets `func=run`."""
    parser.add_argument("data", type=Path, help="records: .jsonl, .jsonl.gz or .json (a list)")
    parser.add_argument(
        "--tokenizer", required=True, help="a local tokenizer directory (AutoTokenizer)"
    )
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per item")
    parser.add_argument("--shuffle", action="store_true", help="shuffle documents before packing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    parser.add_argument(
        "--fields",
        default=None,
        help="map the file's keys to ours, SOURCE=TARGET pairs, e.g. question=prompt,answer=response",
    )
    parser.add_argument(
        "--response-only", action="store_true", help="train only on response tokens and EOS"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $SFTUNE_CACHE_DIR/packed"
    )
    parser.set_defaults(func=run)


def load_tokenizer(name: str):
    """The tokenizer of a local directory or preset; failures as one line."""
    from sftune.models import load_tokenizer as _load

    try:
        return _load(name)
    except SftuneError:
        raise
    except Exception as e:  # transformers raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SftuneError(f"cannot load the tokenizer from {name}: {first}") from e


def run(args: argparse.Namespace) -> int:
    """Build (or load from the cache) the packed dataset and print its statistics."""
    if not Path(args.data).is_file():  # before the slow imports and the tokenizer load
        raise DataError(args.data, "no such file")
    from sftune.data.packing import PackedSFTDataset

    tokenizer = load_tokenizer(args.tokenizer)
    dataset = PackedSFTDataset(
        tokenizer,
        args.data,
        args.seq_length,
        args.shuffle,
        seed=args.seed,
        fields=parse_fields(args.fields),
        response_only=args.response_only,
        cache_dir=args.cache_dir,
        verbose=True,
    )
    stats = dataset.stats
    print(f"trained tokens: {stats.trained_tokens:,} of {stats.items * stats.seq_length:,}")
    return 0
