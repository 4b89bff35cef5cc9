"""`sftune prepare`: tokenize, pack and cache a dataset ahead of training, and print its stats.

    sftune prepare ../shared/data/gsm8k/train.jsonl --tokenizer /path/to/tokenizer_dir \\
        --seq-length 512 --fields question=prompt,answer=response

Training with the same file, tokenizer, field mapping and masking then loads the packed
stream from the cache (`$SFTUNE_CACHE_DIR/packed`) instead of tokenizing again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sftune.data.formats import CANONICAL_FIELDS
from sftune.errors import ConfigError, DataError, SftuneError


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
        type=parse_fields,
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


def parse_fields(text: str) -> dict[str, str]:
    """`question=prompt,answer=response` -> {"prompt": "question", "response": "answer"}.

    Each pair names one of our fields (prompt, response, messages) on either side; the
    other side is the file's key.

        >>> parse_fields("question=prompt,answer=response")
        {'prompt': 'question', 'response': 'answer'}
    """
    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        left, sep, right = (s.strip() for s in pair.partition("="))
        if not sep or not left or not right:
            raise argparse.ArgumentTypeError(f"expected SOURCE=TARGET, got {pair!r}")
        if right in CANONICAL_FIELDS:
            mapping[right] = left
        elif left in CANONICAL_FIELDS:
            mapping[left] = right
        else:
            raise argparse.ArgumentTypeError(
                f"{pair!r} names none of our fields {', '.join(CANONICAL_FIELDS)}"
            )
    return mapping


def load_tokenizer(name: str):
    """`AutoTokenizer.from_pretrained(name)` for a local directory, failures as one line."""
    from transformers import AutoTokenizer

    if not Path(name).is_dir():
        raise ConfigError(f"--tokenizer {name}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(name)
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
        fields=args.fields,
        response_only=args.response_only,
        cache_dir=args.cache_dir,
        verbose=True,
    )
    stats = dataset.stats
    print(f"trained tokens: {stats.trained_tokens:,} of {stats.items * stats.seq_length:,}")
    return 0
