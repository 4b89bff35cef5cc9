#!/usr/bin/env python3
"""GSM8K preference pairs from your own model's samples, judged by the final `#### N` answer.

    sftune generate --model runs/sft/final --data $D/train.jsonl \\
        --fields question=prompt,answer=response --num-samples 4 --temperature 0.7 \\
        --out samples.jsonl
    python scripts/gsm8k_pairs.py samples.jsonl pairs.jsonl

Reads the rows `sftune generate --data` writes (`prompt`, `outputs`, the source's `answer`, see
sftune/sampling.py) and writes one `{"prompt", "chosen", "rejected"}` pair per question:

- a sample is correct when its answer equals the gold answer's, each read as lm-eval's gsm8k
  strict-match reads them (src/sftune/eval_tasks/gsm8k.yaml): the first `#### N` match of
  `#### (\\-?[0-9\\.\\,]+)`, then `,` and `$` removed and one final `.` dropped. A sample with no
  `#### N` is wrong, as strict-match scores it;
- chosen: the first correct sample, or the gold answer when no sample is correct;
- rejected: the first wrong sample;
- a question whose samples are all correct has no rejected answer: it is skipped.

A chat prompt (a list of messages) gets chosen and rejected as lists of one assistant message,
the conversational pair form. The counts go to stderr. The test split is never used to build
pairs: a samples file named like a test split (`test`, `gsm8k_test.jsonl`), or whose rows came
from such a data file (their `data_file`), is refused. The output file must be new; it appears
only when complete. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k strict-match
TEST_NAME = re.compile(r"(^|[^a-z])test([^a-z]|$)", re.IGNORECASE)


class PairsError(Exception):
    """A one-line error: the file, the line and what to do."""


def final_answer(text: str) -> str | None:
    """The `#### N` answer as strict-match compares it, or None when there is none."""
    match = STRICT.search(text)
    if not match:
        return None
    value = match.group(1).replace(",", "").replace("$", "")
    return value[:-1] if value.endswith(".") else value


def pair_of(row: dict, gold_field: str) -> tuple[dict | None, str]:
    """(the pair, or None) and its kind: "sampled" (a correct sample is chosen), "gold" (no
    sample was correct) or "skipped" (no sample was wrong)."""
    gold = final_answer(row[gold_field])
    right = [s for s in row["outputs"] if final_answer(s) == gold]
    wrong = [s for s in row["outputs"] if final_answer(s) != gold]
    if not wrong:
        return None, "skipped"
    chosen, kind = (right[0], "sampled") if right else (row[gold_field], "gold")
    rejected = wrong[0]
    pair = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    if not isinstance(row["prompt"], str):  # a chat: the conversational pair form
        pair["chosen"] = [{"role": "assistant", "content": chosen}]
        pair["rejected"] = [{"role": "assistant", "content": rejected}]
        if row.get("tools"):
            pair["tools"] = row["tools"]  # the chat's tool definitions, as sampled with
    return pair, kind


def _refuse_test(path: str | Path, what: str) -> None:
    if TEST_NAME.search(Path(path).name):
        raise PairsError(
            f"{what} {path}: named like a test split; pairs are built from the train split only"
        )


def _check_row(path: Path, line: int, row: object, gold_field: str) -> dict:
    def fail(problem: str) -> PairsError:
        return PairsError(f"{path}:{line}: {problem}")

    if not isinstance(row, dict):
        raise fail("a row must be a JSON object (the rows `sftune generate --data` writes)")
    for key, kind in (("prompt", (str, list)), ("outputs", list), (gold_field, str)):
        if key not in row:
            hint = " (give --gold-field)" if key == gold_field else ""
            raise fail(f"{key}: missing{hint}")
        if not isinstance(row[key], kind):
            raise fail(f"{key}: has the wrong type ({type(row[key]).__name__})")
    if not row["outputs"] or not all(isinstance(s, str) for s in row["outputs"]):
        raise fail("outputs: must be a non-empty list of strings")
    if final_answer(row[gold_field]) is None:
        raise fail(f"{gold_field}: the gold answer has no '#### N' line")
    if "data_file" in row:
        _refuse_test(str(row["data_file"]), f"{path}:{line}: sampled from")
    return row


def build(samples: Path, out: Path, gold_field: str = "answer") -> dict[str, int]:
    """Write the pairs of `samples` to `out` (new, atomically); the counts of each kind."""
    _refuse_test(samples, "samples file")
    if out.exists() or out.is_symlink():
        raise PairsError(f"{out}: already exists; give a new file name (nothing is replaced)")
    counts = {"questions": 0, "pairs": 0, "sampled": 0, "gold": 0, "skipped": 0}
    pairs: list[str] = []
    try:
        with samples.open(encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PairsError(f"{samples}:{line}: not valid JSON ({e.msg})") from None
                pair, kind = pair_of(_check_row(samples, line, row, gold_field), gold_field)
                counts["questions"] += 1
                counts[kind] += 1
                if pair is not None:
                    pairs.append(json.dumps(pair, ensure_ascii=False))
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{samples}: cannot read ({e})") from None
    counts["pairs"] = len(pairs)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(p + "\n" for p in pairs)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("samples", type=Path, help="the rows of `sftune generate --data`")
    parser.add_argument("out", type=Path, help="the pairs file to write (JSON Lines, new)")
    parser.add_argument(
        "--gold-field", default="answer", help="the row's gold answer (default: answer)"
    )
    args = parser.parse_args(argv)
    try:
        c = build(args.samples, args.out, args.gold_field)
    except PairsError as e:
        print(f"gsm8k_pairs: error: {e}", file=sys.stderr)
        return 2
    print(
        f"gsm8k_pairs: {c['questions']:,} questions: {c['pairs']:,} pairs written to {args.out} "
        f"({c['sampled']:,} with a correct sample chosen, {c['gold']:,} with the gold answer "
        f"chosen as no sample was correct); {c['skipped']:,} skipped, every sample correct",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
