"""Benchmark the data path at long lengths (issue 26): chat prefix rendering, and packing with
`--train-on assistant` masking of 32K-200K-token conversations.

    .venv/bin/python benchmarks/long_data.py [--parts chat,packing,mask] [--out FILE]

`chat`: a generated agent transcript of 10, 50 and 200 user turns (a system prompt; each user
turn answered, every other one first by a tool call and its result; a tools list), rendered
into a `Document` with `--train-on assistant` by `--chat-template chatml` and `llama3` on the
Llama 3 tokenizer: the noted-starts render (one render per record) against rendering every
prefix (what sftune did before: monkeypatched back here), the fastest of `--repeats`.

`packing`: for each length L in `--lengths` (default 32K, 64K, 128K, 200K tokens), a file of
`--conversations` long reasoning traces (a system prompt, a GSM8K question, and an assistant
answer of about L - 200 tokens: GSM8K solutions one after another inside <think> ... </think>,
then the answer; a second user turn and a short answer), packed by `PackedSFTDataset` at
`seq_length` L with the Llama 3 tokenizer, `--chat-template llama3`, no cache. Each build
runs in its own subprocess, `--train-on all` and `assistant`, and reports its wall time,
its peak RSS and the RSS before the build (imports and tokenizer), and the bare
`tokenizer(texts)` time of the same rendered texts. `--batch-chars 1000000000000` builds as
before the character bound on tokenizer batches (`tokenize.BATCH_CHARS`).

`mask`: the document mask transformers 5 builds for packed rows (position_ids restarting at 0
at each document, no attention_mask: `masking_utils.create_causal_mask`), three documents per
row, for `--attn sdpa` (a dense bool (1, 1, T, T) tensor) at `--sdpa-lengths` and for
`flex_attention` (a BlockMask, `create_block_mask` compiled, so the T x T mask is evaluated by
blocks and never stored) at `--flex-lengths`; each in its own subprocess: wall time (flex: its
compile included), the growth of peak RSS during the build, and the bytes of the mask it
returns.

Prints a table and, with --out, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))  # this checkout's sftune

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


def tokenizer(template: str = "llama3"):
    from sftune.data.chat_templates import NAMED_TEMPLATES
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    tok = build_llama3_tokenizer(Path(tempfile.mkdtemp(prefix="llama3-")))
    tok.chat_template = NAMED_TEMPLATES[template]
    tok.eos_token = "<|eot_id|>"  # Llama 3 Instruct's end of turn
    return tok


def agent_transcript(turns: int) -> dict:
    messages = [{"role": "system", "content": "You are a coding agent working in a repository."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Step {i}: check module {i} for the bug."})
        if i % 2:
            call = {"name": "read_file", "arguments": json.dumps({"path": f"src/mod{i}.py"})}
            messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": call}],
                }
            )
            body = "".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(20))
            messages.append({"role": "tool", "content": body})
        messages.append({"role": "assistant", "content": f"Module {i} looks right: " * 10})
    return {"messages": messages, "tools": TOOLS}


def bench_chat(repeats: int) -> list[dict]:
    from sftune.data import templates
    from sftune.data.formats import read_records
    from sftune.data.templates import DocumentRenderer, _ChatTemplate

    noting = _ChatTemplate.render_noting_starts

    def every_prefix(self, messages, tools):
        return self.render([messages], tools, False)[0], None

    rows = []
    for template in ("chatml", "llama3"):
        tok = tokenizer(template)
        for turns in (10, 50, 200):
            path = Path(tempfile.mkdtemp()) / "agent.jsonl"
            path.write_text(json.dumps(agent_transcript(turns)) + "\n")
            record = read_records(path)[0]
            row = {"template": template, "turns": turns, "messages": len(record.messages)}
            docs = {}
            for name, method in (("one_render", noting), ("every_prefix", every_prefix)):
                templates._ChatTemplate.render_noting_starts = method
                renderer = DocumentRenderer(tok, "assistant")
                renderer.render(record)  # compiles the template
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    docs[name] = renderer.render(record)
                    best = min(best, time.perf_counter() - start)
                row[f"{name}_s"] = best
            templates._ChatTemplate.render_noting_starts = noting
            assert docs["one_render"] == docs["every_prefix"]  # the same text and spans
            row["chars"] = len(docs["one_render"].text)
            row["tokens"] = len(tok(docs["one_render"].text)["input_ids"])
            row["speedup"] = row["every_prefix_s"] / row["one_render_s"]
            rows.append(row)
            print(
                f"chat {template:7s} {turns:4d} turns {row['messages']:4d} messages "
                f"{row['tokens']:7,d} tokens: one render {row['one_render_s'] * 1e3:8.1f} ms, "
                f"every prefix {row['every_prefix_s'] * 1e3:8.1f} ms ({row['speedup']:.0f}x)",
                flush=True,
            )
    return rows


def _solutions() -> list[str]:
    path = SHARED / "data/gsm8k/train.jsonl"
    return [json.loads(line)["answer"] for line in path.read_text().splitlines()]


def long_trace_file(tok, length: int, conversations: int, directory: Path) -> Path:
    """`conversations` reasoning traces of about `length` tokens each (see the module doc)."""
    solutions = _solutions()
    per = [len(ids) for ids in tok(solutions[:500], add_special_tokens=False)["input_ids"]]
    mean = sum(per) / len(per)
    lines = []
    for c in range(conversations):
        count = int((length - 200) / (mean + 2))
        first = (c * 997) % len(solutions)
        picked = [solutions[(first + k) % len(solutions)] for k in range(count)]
        trace = "<think>\n" + "\n\n".join(picked) + "\n</think>\n\nThe answer is 42."
        messages = [
            {"role": "system", "content": "Reason step by step before you answer."},
            {"role": "user", "content": f"Solve these problems, number {c}."},
            {"role": "assistant", "content": trace},
            {"role": "user", "content": "Thanks. Which was hardest?"},
            {"role": "assistant", "content": "The third one: it had the most steps."},
        ]
        lines.append(json.dumps({"messages": messages}))
    path = directory / f"traces_{length}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def child(path: str, seq_length: int, train_on: str, batch_chars: int) -> None:
    """One build in this process: prints its numbers as a JSON line."""
    from sftune.data import PackedSFTDataset, tokenize

    if batch_chars:  # --batch-chars: tokenize.BATCH_CHARS for this build
        tokenize.BATCH_CHARS = batch_chars
    from sftune.data.formats import read_records
    from sftune.data.templates import DocumentRenderer

    tok = tokenizer("llama3")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    ds = PackedSFTDataset(
        tok, path, seq_length, False, train_on=train_on, use_cache=False, verbose=False
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trained = int(sum((ds[i]["labels"] != -100).sum() for i in range(len(ds))))
    texts = [DocumentRenderer(tok, train_on).render(r).text for r in read_records(path)]
    start = time.perf_counter()
    tok(texts)
    bare = time.perf_counter() - start
    out = {
        "seconds": seconds,
        "bare_tokenize_s": bare,
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "tokens": int(len(ds.tokens)),
        "items": len(ds),
        "trained_labels": trained,
    }
    print(json.dumps(out))


def bench_packing(
    lengths: list[int], conversations: int, modes: list[str], batch_chars: int
) -> list[dict]:
    rows = []
    tok = tokenizer("llama3")
    directory = Path(tempfile.mkdtemp(prefix="long-data-"))
    for length in lengths:
        path = long_trace_file(tok, length, conversations, directory)
        for train_on in modes:
            command = [sys.executable, __file__, "_child", str(path), str(length), train_on]
            command.append(str(batch_chars))
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {"seq_length": length, "conversations": conversations, "train_on": train_on}
            row |= json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"packing {length:7,d} x {conversations} train_on {train_on:9s}: "
                f"{row['seconds']:6.2f} s (bare tokenize {row['bare_tokenize_s']:5.2f} s), "
                f"peak RSS {row['peak_rss_mib']:6.0f} MiB (before {row['rss_before_mib']:.0f}), "
                f"{row['tokens']:,} tokens, {row['trained_labels']:,} trained",
                flush=True,
            )
    return rows


def mask_child(length: int, attn: str) -> None:
    """One mask build in this process: prints its numbers as a JSON line."""
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = attn
    docs = [length // 4, length // 4, length - length // 2]
    positions = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    embeds = torch.zeros(1, length, 8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    mask = create_causal_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=None,
        cache=None,
        position_ids=positions,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if isinstance(mask, torch.Tensor):
        kind, size = f"dense {tuple(mask.shape)} {mask.dtype}", mask.numel() * mask.element_size()
    else:
        tensors = [t for t in mask.as_tuple() if isinstance(t, torch.Tensor)]
        kind, size = "BlockMask", sum(t.numel() * t.element_size() for t in tensors)
    out = {"seconds": seconds, "peak_rss_growth_mib": peak - before, "mask": kind}
    print(json.dumps(out | {"mask_mib": size / 2**20}))


def bench_mask(sdpa_lengths: list[int], flex_lengths: list[int]) -> list[dict]:
    rows = []
    for attn, lengths in (("sdpa", sdpa_lengths), ("flex_attention", flex_lengths)):
        for length in lengths:
            command = [sys.executable, __file__, "_mask", str(length), attn]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {"attn": attn, "seq_length": length}
            row |= json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"mask {attn:14s} {length:7,d}: {row['seconds']:6.1f} s, peak RSS "
                f"+{row['peak_rss_growth_mib']:7.0f} MiB, returns {row['mask']} "
                f"({row['mask_mib']:.1f} MiB)",
                flush=True,
            )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_mask":
        mask_child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="chat,packing,mask")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="32768,65536,131072,204800")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--train-on", default="all,assistant")
    parser.add_argument(
        "--batch-chars",
        type=int,
        default=0,
        help="characters per tokenizer batch (0: tokenize.BATCH_CHARS; 10**12: no bound, as "
        "before issue 26)",
    )
    parser.add_argument("--sdpa-lengths", default="8192,16384,32768")
    parser.add_argument("--flex-lengths", default="32768,65536,131072")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    parts = args.parts.split(",")
    result: dict = {"machine": "2-core CPU of this machine"}
    if "chat" in parts:
        result["chat"] = bench_chat(args.repeats)
    if "packing" in parts:
        lengths = [int(x) for x in args.lengths.split(",")]
        modes = args.train_on.split(",")
        result["packing"] = bench_packing(lengths, args.conversations, modes, args.batch_chars)
    if "mask" in parts:
        result["mask"] = bench_mask(
            [int(x) for x in args.sdpa_lengths.split(",")],
            [int(x) for x in args.flex_lengths.split(",")],
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
