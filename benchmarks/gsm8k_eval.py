"""GSM8K accuracy of a model: greedy decoding of Alpaca-rendered questions, exact match of the
number after `####`.

    python benchmarks/gsm8k_eval.py --model runs/smollm2/final --data ../shared/data/gsm8k/test.jsonl \
        --limit 200 --out results.json

The prompt is the same Alpaca rendering that training uses, so a tuned model answers in the
GSM8K format ("... #### 42"). A prediction counts when the number after the first `####` of the
generated text equals the reference's, ignoring commas and a trailing ".0".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sftune.data import read_records  # noqa: E402
from sftune.data.templates import render_alpaca  # noqa: E402
from sftune.models import load_model_and_tokenizer  # noqa: E402

_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def extract(text: str) -> str | None:
    """The number after the first `####`, normalised ("1,000.0" -> "1000")."""
    m = _ANSWER.search(text)
    if not m:
        return None
    num = m.group(1).replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations, left-padded batches with the KV cache."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    outs = []
    for lo in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[lo : lo + batch_size], return_tensors="pt", padding=True).to(
            model.device
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        outs += tokenizer.batch_decode(
            gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="model directory or preset")
    ap.add_argument("--data", required=True, help="GSM8K test JSON Lines (question, answer)")
    ap.add_argument("--limit", type=int, default=200, help="first N problems")
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, info = load_model_and_tokenizer(a.model, device=device, dtype=a.dtype)
    model.eval()
    records = read_records(a.data, {"prompt": "question", "response": "answer"})[: a.limit]
    prompts = [render_alpaca(r.prompt, "")[0] for r in records]
    start = time.perf_counter()
    outputs = generate(model, tok, prompts, a.max_new_tokens, a.batch_size)
    seconds = time.perf_counter() - start
    rows = []
    for r, out in zip(records, outputs, strict=True):
        pred, ref = extract(out), extract(r.response)
        rows.append(
            {
                "question": r.prompt,
                "reference": ref,
                "prediction": pred,
                "output": out,
                "correct": pred is not None and pred == ref,
            }
        )
    correct = sum(row["correct"] for row in rows)
    formatted = sum(row["prediction"] is not None for row in rows)
    result = {
        "model": a.model,
        "problems": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows),
        "answered_with_####": formatted,
        "seconds": seconds,
        "examples": rows[:5],
        "rows": rows,
    }
    print(
        f"GSM8K {a.model}: {correct}/{len(rows)} = {100 * correct / len(rows):.1f}% exact match "
        f"({formatted} answers in the #### format), {seconds:.0f} s"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
