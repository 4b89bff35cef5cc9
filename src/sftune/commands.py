"""`sftune train | eval | generate`: argument parsers and the functions they call."""

from __future__ import annotations

import argparse
import math

import torch

from sftune import config as config_mod
from sftune.data.formats import parse_fields


def add_train(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from sftune.train.loop import train

    result = train(config_mod.from_args(args))
    if result.interrupted:
        return 130
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or preset")
    parser.add_argument("--data", required=True, help="JSON Lines file of prompt/response records")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fields", default=None, help="e.g. prompt=question,response=answer")
    parser.add_argument("--response-only", action="store_true", help="score response tokens only")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=run_eval)


@torch.no_grad()
def evaluate_model(module, dataset, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(token-weighted mean loss, trained tokens) of a model over a packed dataset."""
    from sftune.train.loss import IGNORE_INDEX

    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for lo in range(0, len(dataset), batch_size):
        b = dataset.get_batch(range(lo, min(lo + batch_size, len(dataset))))
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        total += module(ids, labels, None, 1.0).double()
        count += int((labels != IGNORE_INDEX).sum())
    return float(total) / max(count, 1), count


def run_eval(args: argparse.Namespace) -> int:
    from sftune.data import PackedSFTDataset
    from sftune.models import load_model_and_tokenizer
    from sftune.train.lm import CausalLMWithLoss

    device = _device(args.device)
    model, tokenizer, _ = load_model_and_tokenizer(args.model, device=device, dtype=args.dtype)
    ds = PackedSFTDataset(
        tokenizer,
        args.data,
        args.seq_length,
        False,
        fields=parse_fields(args.fields),
        response_only=args.response_only,
    )
    module = CausalLMWithLoss(model, fused=False)
    loss, count = evaluate_model(module, ds, args.batch_size, device)
    print(
        f"loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.3f} | {count} tokens | {args.data}"
    )
    return 0


def add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or preset")
    parser.add_argument(
        "--prompt", required=True, help="the instruction; rendered with the Alpaca template"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from sftune.data.templates import render_alpaca
    from sftune.models import load_model_and_tokenizer
    from sftune.train.lm import CausalLMWithLoss, greedy_generate

    device = _device(args.device)
    model, tokenizer, _ = load_model_and_tokenizer(args.model, device=device, dtype=args.dtype)
    prompt_part, _ = render_alpaca(args.prompt, "")
    ids = tokenizer(prompt_part)["input_ids"]
    module = CausalLMWithLoss(model, fused=False).eval()
    out = greedy_generate(module, ids, args.max_new_tokens, tokenizer.eos_token_id, sharded=False)
    print(tokenizer.decode(out, skip_special_tokens=True))
    return 0
