"""The `sftune` command line: thin parsers that call into the package.

sftune train    --config configs/demo.yaml          # fine-tune (see sftune.train)
sftune eval     --model DIR --data FILE             # token-weighted loss and perplexity
sftune generate --model DIR --prompt "..."          # Alpaca-rendered prompt -> response
sftune prepare  DATA --tokenizer TOK --seq-length N # build and cache a packed dataset
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch touches CUDA: segments that grow instead of fragmenting let the largest
# micro-batch fit near the memory limit (as torchtitan sets it). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from sftune.errors import SftuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from sftune import commands, prepare

    commands.add_train(sub.add_parser("train", help="fine-tune a model (see sftune.train.loop)"))
    commands.add_eval(
        sub.add_parser("eval", help="token-weighted loss and perplexity of a model on a file")
    )
    commands.add_generate(
        sub.add_parser("generate", help="greedy response to an Alpaca-rendered prompt")
    )
    prepare.add_arguments(sub.add_parser("prepare", help="build and cache a packed dataset"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SftuneError as e:
        print(f"sftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftune: interrupted", file=sys.stderr)
        return 130
