"""DPO training throughput and peak memory: `sftune train --objective dpo` against TRL's DPOTrainer.

Same model, same pairs, same pairs per optimizer step, one GPU, one command. Each run is its own
Python process (a clean peak-memory reading; one failed run does not lose the others), started
by this script, which then prints a table and writes one JSON.

    # one H200: the Llama 3.1 8B config, random init, LoRA r 16 on all seven linears
    # (`benchmarks/gpu.sh dpo` runs this, after installing TRL & co. from the index or --wheels):
    python benchmarks/dpo.py --out runs/bench/dpo.json
    # offline, from a folder of wheels (installed into a temporary folder put first on sys.path;
    # the machine's torch, transformers, numpy and tokenizers are never replaced):
    python benchmarks/dpo.py --wheels .whl --out runs/bench/dpo.json
    # CPU smoke test of both paths: a tiny Llama (Llama 3 vocabulary), short pairs, 3 steps;
    # in fp32 the two +ordered runs' losses agree to about 1e-6 (7.9e-7 when it was written)
    python benchmarks/dpo.py --config tiny --device cpu --steps 3 --warmup 1 --lr 1e-3 \
        --runs sftune+lora+ordered,trl-mb2+ordered,sftune+lora --pairs-per-step 8 \
        --seq-length 256 --prompt-words 24 --response-words 10,20 --out /tmp/dpo-cpu.json

Runs (comma-separated --runs; default: the issue's TRL anchors and sftune's targets):
    trl            TRL 1.16 DPOTrainer as its docs configure it: peft LoraConfig (r 16, alpha 32,
                   all linears but the output head), gradient checkpointing (its default),
                   micro-batch 4 x accumulation (pairs per step / 4), precomputed reference
                   log-probs (precompute_ref_log_probs=True), bf16, fused AdamW
    trl-mbN        the same with micro-batch N and no gradient checkpointing (+ac puts it back)
    sftune         `sftune train --objective dpo`, the micro-batch its probe picks
    sftune-mbN     the same with micro-batch N (rows of --seq-length tokens)
Modifiers, appended with "+":
    +lora (the default), +qlora (4-bit NF4 base, bitsandbytes), +full (every weight)
    +capN          sftune: --max-memory-gib N (the probe plans micro-batch and checkpointing)
    +ac            activation / gradient checkpointing on
    +eager         sftune: --compile off
    +noprecompute  TRL: the reference forward in every step (precompute_ref_log_probs=False)
    +padfree       TRL: padding_free=True (TRL 1.16 warns and falls back to padding: recorded)
    +liger         TRL: use_liger_kernel=True (needs liger-kernel)
    +ordered       the per-step loss comparison: no shuffling, and TRL takes, step by step, the
                   very pairs that sftune's packed rows hold (one micro-batch per step), so the
                   two runs' per-step losses can be compared (`loss_parity` in the JSON)

The pairs: --gsm8k FILE builds them as issue 25 does (the question as the prompt, its answer as
chosen, the next question's answer as rejected); --pairs FILE takes any {prompt, chosen,
rejected} JSON Lines file; otherwise synthetic pairs are written (seeded; words drawn from the
Llama 3 vocabulary, about one token each: a prompt of --prompt-words, responses of
--response-words MIN,MAX). Both sides read the same strings: sftune the file itself, TRL the
prompt rendered by sftune's Alpaca template and the two responses (TRL appends the EOS, as
sftune does). The token ids both sides train on are compared (`token_mismatches` in the JSON).

Pairs per step: TRL takes --pairs-per-step pairs (micro-batch x accumulation). sftune packs
whole pairs (`prompt | chosen | rejected`, the prompt once) into rows of --seq-length tokens and
takes --batch-size rows per step; the default batch is the number of rows that holds
--pairs-per-step pairs on average (measured here by sftune's own pair packer), and both the
mean and the range are reported.

sftune validates at the start and the end of a run; its --val-data is the first --val-pairs
pairs of the training file (every pair still trains, as on the TRL side), and its packed-data
cache is a fresh folder per run (SFTUNE_CACHE_DIR), so every run computes its reference pass.

The model: a random init of --config (seed 0) with the Llama 3 tokenizer, saved once into
--model-dir (default runs/bench/dpo-model-CONFIG, 16 GB for the 8B; reused while its config
matches), and loaded from there by both sides. The Llama 3 tokenizer is read from --tokenizer
DIR (default runs/llama3-tokenizer), built there from the `llama-models` package if absent.

What is measured, per run: pairs/s and tokens/s of the steady steps (after --warmup steps),
pairs/s over the whole run with the reference pass included (TRL: its precompute pass in
DPOTrainer's constructor + training; sftune: the wall time of `train(cfg)`, model load and
compile included, less nothing), the reference pass's own time where known, peak GPU memory
(torch.cuda.max_memory_allocated over the whole process), and every step's loss.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "src"))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The allocator setting that `sftune train` makes for itself (sftune/cli.py), here for both
# sides, since the sftune runs call train() without the CLI.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What the TRL side needs besides sftune (datasets 5.x could not fingerprint TRL's datasets:
# docs/BENCHMARKS.md, "Against TRL").
TRL_NEEDS = ["trl==1.16.0", "datasets==4.8.5"]
LORA_R, LORA_ALPHA = 16, 32.0
# TRL's settings (issue 25's anchors, and the reference forward in every step), sftune's targets,
# and the two runs whose per-step losses are compared. benchmarks/gpu.sh runs them in three
# invocations (one device call each).
DEFAULT_RUNS = (
    "trl,trl+noprecompute,trl-mb8,trl-mb8+padfree,trl-mb8+liger,"
    "sftune+lora,sftune+lora+cap24,sftune+qlora+cap12,sftune+full,"
    "trl-mb4+ac+ordered,sftune+lora+ordered"
)
SFTUNE_MODS = {"lora", "qlora", "full", "ac", "eager", "ordered"}
TRL_MODS = {"lora", "qlora", "full", "ac", "noprecompute", "padfree", "liger", "ordered"}


# ----------------------------------------------------------------------------- runs


def parse_run(name: str) -> dict:
    """`trl-mb8+padfree` -> {side, micro, mods, cap}; SystemExit on a name it does not know."""
    base, *mods = name.split("+")
    side, _, micro = base.partition("-mb")
    if side not in ("trl", "sftune") or (micro and not micro.isdigit()) or base.endswith("-mb"):
        raise SystemExit(f"unknown run {name!r}: trl[-mbN] or sftune[-mbN], then +modifiers")
    cap = None
    for m in mods:
        if side == "sftune" and m.startswith("cap"):
            cap = float(m.removeprefix("cap"))
        elif m not in (SFTUNE_MODS if side == "sftune" else TRL_MODS):
            raise SystemExit(f"run {name!r}: +{m} is not a {side} modifier (see --help)")
    weights = [m for m in mods if m in ("lora", "qlora", "full")]
    if len(weights) > 1:
        raise SystemExit(f"run {name!r}: one of +lora, +qlora, +full")
    return dict(
        name=name,
        side=side,
        micro=int(micro) if micro else None,
        weights=weights[0] if weights else "lora",
        mods=set(mods),
        cap=cap,
    )


def trl_shape(run: dict, pairs_per_step: int) -> tuple[int, int, bool]:
    """(micro-batch, accumulation, gradient checkpointing) of a TRL run: `trl` is TRL's defaults
    (checkpointing, micro-batch 4), `trl-mbN` micro-batch N without checkpointing."""
    micro = run["micro"] or 4
    if pairs_per_step % micro:
        raise SystemExit(
            f"{run['name']}: --pairs-per-step {pairs_per_step} is not a multiple of {micro}"
        )
    checkpointing = run["micro"] is None or "ac" in run["mods"]
    return micro, pairs_per_step // micro, checkpointing


# ----------------------------------------------------------------------------- wheels


def requirements(runs: list[dict], tokenizer_dir: Path) -> list[str]:
    """What the chosen runs need (deps.py's notation)."""
    needs = ["sftune", "sftune[lora]"]
    if any(r["side"] == "trl" for r in runs):
        needs += TRL_NEEDS
    if any(r["weights"] == "qlora" for r in runs):
        needs.append("sftune[qlora]")
    if any("liger" in r["mods"] for r in runs):
        needs.append("liger-kernel")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        needs += ["llama-models==0.3.0", "tiktoken>=0.7"]  # to build the Llama 3 tokenizer
    return needs


def install_wheels(wheels: Path, needs: list[str]) -> Path:
    """Install what this Python lacks of `needs`, only from `wheels`, into a temporary folder that
    goes first on sys.path and on the runs' PYTHONPATH (benchmarks/deps.py does the work)."""
    import deps

    target = Path(tempfile.mkdtemp(prefix="sftune-dpo-site-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)  # after the runs, which use it
    done = deps.ensure(needs, target, wheels.resolve())
    print(f"dpo: installed {', '.join(done) or 'nothing'} from {wheels} into {target}", flush=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(target), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return target


# ----------------------------------------------------------------------------- pairs


def synthetic_pairs(
    tokenizer, n: int, prompt_words: int, response_words: tuple[int, int], seed: int
):
    """`n` seeded pairs of words drawn from the tokenizer's own vocabulary (lowercase words with
    a leading space, about one token each): a prompt of about `prompt_words` words (+-20%) and
    responses of `response_words` (min, max) words, with a full stop every 8 to 16 words."""
    import numpy as np

    vocab = sorted(
        t[1:]
        for t in tokenizer.get_vocab()
        if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower()
    )
    words = np.array([w for w in vocab if 3 <= len(w) <= 9])
    rng = np.random.default_rng(seed)

    def text(count: int) -> str:
        out, since = [], 0
        for w in rng.choice(words, size=count):
            out.append(str(w))
            since += 1
            if since >= rng.integers(8, 17):
                out[-1] += "."
                since = 0
        return " ".join(out).capitalize().rstrip(".") + "."

    lo, hi = response_words
    for _ in range(n):
        p = int(rng.integers(int(prompt_words * 0.8), int(prompt_words * 1.2) + 1))
        yield {
            "prompt": text(p),
            "chosen": text(int(rng.integers(lo, hi + 1))),
            "rejected": text(int(rng.integers(lo, hi + 1))),
        }


def gsm8k_pairs(path: Path, n: int):
    """Issue 25's pairs: the question as the prompt, its answer as chosen, the next question's
    answer as rejected (the last takes the first's)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[: n + 1]
    for i in range(min(n, len(rows))):
        nxt = rows[(i + 1) % len(rows)]
        yield {
            "prompt": rows[i]["question"],
            "chosen": rows[i]["answer"],
            "rejected": nxt["answer"],
        }


def write_pairs(a, tokenizer, path: Path, n: int) -> None:
    if a.gsm8k:
        rows = list(gsm8k_pairs(Path(a.gsm8k), n))
    else:
        rows = list(synthetic_pairs(tokenizer, n, a.prompt_words, a.response_words, a.seed))
    if len(rows) < n:
        raise SystemExit(f"dpo: {a.gsm8k} has {len(rows)} pairs, {n} needed")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def encode_pairs(path: Path, tokenizer):
    """sftune's reading and encoding of the file: (rendered (prompt, chosen, rejected) texts,
    token ids (prompt, chosen, rejected) with the EOS, as `sftune train --objective dpo` feeds)."""
    from sftune.data.preference import PairEncoder, read_pairs, render_pair

    pairs = read_pairs(path).pairs
    encoder = PairEncoder(tokenizer)
    texts, ids = [], []
    for pair in pairs:
        texts.append(render_pair(pair, tokenizer))
        t = encoder.encode(pair)
        ids.append((t.prompt, t.chosen, t.rejected))
    return texts, ids


def step_groups(
    ids, seq_length: int, rows_per_step: int, steps: int, pad_id: int
) -> list[list[int]]:
    """The pairs that each of sftune's first `steps` optimizer steps trains on, unshuffled: the
    pairs of rows [k * rows_per_step, (k + 1) * rows_per_step) of sftune's pair packer."""
    import numpy as np

    from sftune.data.pairs import pack_pairs

    packed = pack_pairs(
        *[[np.array(x[i]) for x in ids] for i in range(3)], seq_length, pad_id=pad_id
    )
    row_pairs = [sorted({int(p) for p in row if p >= 0}) for row in packed.pair]
    return [
        sorted({p for row in row_pairs[k * rows_per_step : (k + 1) * rows_per_step] for p in row})
        for k in range(steps)
    ]


def prepare_data(a, tokenizer, work: Path) -> dict:
    """Write the pairs (or take --pairs), encode them as sftune does, and size sftune's batch."""
    import numpy as np

    from sftune.data.pairs import pack_pairs

    path = Path(a.pairs) if a.pairs else work / "pairs.jsonl"
    # Enough pairs for every run: TRL's steps, and sftune's rows (a step of sftune may hold a
    # few more pairs than TRL's); the reference pass of both sides covers all of them.
    n = a.num_pairs or int(a.steps * a.pairs_per_step * 1.25) + a.pairs_per_step
    if not a.pairs:
        write_pairs(a, tokenizer, path, n)
    texts, ids = encode_pairs(path, tokenizer)
    # sftune validates at the start and the end of a run: on a few of the pairs (every pair
    # still trains, as on the TRL side, which is not asked to validate)
    val = work / "val_pairs.jsonl"
    val.write_text("".join(path.read_text().splitlines(keepends=True)[: a.val_pairs]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = pack_pairs(
        *[[np.array(x[i]) for x in ids] for i in range(3)], a.seq_length, pad_id=int(pad)
    )
    pairs_per_row = packed.stats["pairs"] / packed.stats["rows"]
    rows = a.batch_size or max(1, round(a.pairs_per_step / pairs_per_row))
    groups = step_groups(ids, a.seq_length, rows, a.steps, int(pad))
    if len(groups[-1]) == 0:
        raise SystemExit(f"dpo: {len(ids)} pairs fill fewer than {a.steps} steps of {rows} rows")
    lengths = np.array([[len(p), len(c), len(r)] for p, c, r in ids])
    return dict(
        pairs_path=str(path),
        val_path=str(val),
        num_pairs=len(ids),
        texts=texts,
        ids=ids,
        tokens=dict(
            prompt_mean=float(lengths[:, 0].mean()),
            chosen_mean=float(lengths[:, 1].mean()),
            rejected_mean=float(lengths[:, 2].mean()),
            # TRL feeds prompt + chosen and prompt + rejected: the prompt twice
            trl_fed_per_pair=float((2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]).mean()),
            sftune_fed_per_pair=float(lengths.sum(1).mean()),
            max_pair=int(lengths.sum(1).max()),
        ),
        packing=dict(packed.stats, pairs_per_row=pairs_per_row),
        sftune_rows_per_step=rows,
        sftune_pairs_per_step=[len(g) for g in groups],
        step_groups=groups,
    )


# ----------------------------------------------------------------------------- model


def model_config(a, tokenizer):
    """The benchmark's LlamaConfig: --config with the tokenizer's vocabulary and special ids."""
    from course_loop import CONFIGS, make_config

    d = dict(CONFIGS[a.config])
    d.update(
        vocab_size=max(d["vocab_size"], len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return make_config(d)


MARKER = "sftune_dpo_bench.json"  # what a saved model directory holds


def model_marker(a, tokenizer) -> dict:
    return {"config": a.config, "vocab": len(tokenizer), "seed": 0}


def saved_model_matches(a, tokenizer, model_dir: Path) -> bool:
    marker = model_dir / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == model_marker(a, tokenizer)


def prepare_model(a, tokenizer, model_dir: Path) -> None:
    """A random init of --config (seed 0) saved with the tokenizer, unless `model_dir` holds it."""
    import torch

    from course_loop import build_model

    marker, want = model_dir / MARKER, model_marker(a, tokenizer)
    if saved_model_matches(a, tokenizer, model_dir):
        print(f"dpo: reusing the model in {model_dir}", flush=True)
        return
    t0 = time.perf_counter()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(model_config(a, tokenizer), device, dtype, seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    marker.write_text(json.dumps(want))
    print(
        f"dpo: saved a random init of {a.config} in {model_dir} ({time.perf_counter() - t0:.0f} s)"
    )


# ----------------------------------------------------------------------------- the TRL side


def trl_model(plan: dict, run: dict, cuda: bool):
    """The saved model as TRL's users load it (QLoRA: 4-bit NF4, double quantization, bf16
    compute), and the peft LoraConfig of `sftune train --lora` (None for +full)."""
    import torch
    import transformers

    from sftune import config as config_mod
    from sftune.transforms import lora

    kw = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if run["weights"] == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        plan["model_dir"], device_map={"": 0} if cuda else None, **kw
    )
    sft_cfg = config_mod.from_flat(dict(lora=True, lora_r=LORA_R, lora_alpha=LORA_ALPHA))
    return model, None if run["weights"] == "full" else lora.peft_config(sft_cfg)


def trl_config(a, plan: dict, run: dict, micro: int, accum: int, checkpointing: bool):
    """DPOConfig for the same recipe as the sftune runs: sigmoid loss, cosine schedule from
    --lr (warmup --warmup-ratio), fused AdamW without weight decay, clipping at 1, bf16."""
    import trl

    cuda = a.device == "cuda"
    return trl.DPOConfig(
        output_dir=str(Path(plan["work"]) / f"trl_{run['name'].replace('+', '_')}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        gradient_checkpointing=checkpointing,
        precompute_ref_log_probs="noprecompute" not in run["mods"],
        precompute_ref_batch_size=a.trl_ref_batch or micro,
        padding_free="padfree" in run["mods"],
        use_liger_kernel="liger" in run["mods"],
        max_length=None,  # every pair whole, as sftune (--truncation refuse)
        beta=a.beta,
        loss_type=["sigmoid"],
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup_ratio,  # transformers 5: a float < 1 is the ratio
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        max_steps=a.steps,
        bf16=cuda,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=a.seed,
        dataloader_num_workers=0,
        use_cpu=not cuda,
    )


def trl_instruments(cuda: bool, groups: list[list[int]] | None):
    """(step timer callback, the trainer class, the reference pass's seconds so far [s]):
    TRL's DPOTrainer with its precompute timed and, for +ordered, each step one micro-batch of
    the pairs of sftune's step (`step_groups`)."""
    import torch
    import trl
    from torch.utils.data import DataLoader

    from trl_sft import step_timer  # the SFT comparison's timer: the same step times

    ref_s = [0.0]

    class Trainer(trl.DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            ref_s[0] += time.perf_counter() - t
            return out

        def get_train_dataloader(self):
            if groups is None:
                return super().get_train_dataloader()
            data = self._remove_unused_columns(self.train_dataset, description="training")
            loader = DataLoader(data, batch_sampler=groups, collate_fn=self.data_collator)
            return self.accelerator.prepare(loader)

    return step_timer(cuda), Trainer, ref_s


def trl_run(a, plan: dict, run: dict) -> dict:
    import datasets
    import peft
    import trl
    from transformers import AutoTokenizer

    cuda = a.device == "cuda"
    micro, accum, checkpointing = trl_shape(run, a.pairs_per_step)
    groups = plan["step_groups"] if "ordered" in run["mods"] else None
    if groups:
        micro, accum = max(len(g) for g in groups), 1
    tok = AutoTokenizer.from_pretrained(plan["model_dir"])
    rows = [dict(zip(("prompt", "chosen", "rejected"), t, strict=True)) for t in plan["texts"]]
    t_load = time.perf_counter()
    model, peft_config = trl_model(plan, run, cuda)
    load_s = time.perf_counter() - t_load
    args = trl_config(a, plan, run, micro, accum, checkpointing)
    timer, trainer_class, ref_s = trl_instruments(cuda, groups)
    t0 = time.perf_counter()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[timer],
    )
    init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    per_step = [len(g) for g in groups] if groups else [micro * accum] * len(timer.times)
    return dict(
        side="trl",
        trl=trl.__version__,
        peft=peft.__version__,
        datasets=datasets.__version__,
        micro_batch=micro,
        accum=accum,
        gradient_checkpointing=checkpointing,
        precompute_ref_log_probs=args.precompute_ref_log_probs,
        padding_free_after_init=getattr(trainer, "padding_free", None),
        pairs_per_step=per_step,
        step_times_s=timer.times,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        load_s=load_s,
        init_s=init_s,  # tokenization, the model hash and the reference pass
        reference_s=ref_s[0] if args.precompute_ref_log_probs else None,
        train_s=train_s,
        # pairs trained / (reference pass + training): the issue's "reference pass included"
        pairs_per_s_with_reference=sum(per_step) / (train_s + ref_s[0]),
        **token_check(trainer.train_dataset, plan["ids"]),
        log_history=trainer.state.log_history,
    )


def token_check(dataset, ids) -> dict:
    """How many pairs TRL tokenized otherwise than sftune (prompt, chosen + EOS, rejected + EOS)."""
    mismatches, first = 0, None
    for i, (p, c, r) in enumerate(ids):
        row = dataset[i]
        theirs = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        if tuple(map(list, theirs)) != (list(p), list(c), list(r)):
            mismatches += 1
            first = i if first is None else first
    return dict(token_mismatches=mismatches, first_mismatch=first)


# ----------------------------------------------------------------------------- the sftune side


def sftune_flat(a, plan: dict, run: dict, out: Path) -> dict:
    """`sftune train --objective dpo ...` as a flat config: the TRL runs' recipe (cosine from
    --lr, no weight decay, clipping at 1), every pair trained, logged every step, no final/."""
    flat = dict(
        model=plan["model_dir"],
        train_data=plan["pairs_path"],
        val_data=plan["val_path"],  # every pair trains, as on the TRL side
        objective="dpo",
        beta=a.beta,
        truncation="refuse",
        seq_length=a.seq_length,
        batch_size=plan["sftune_rows_per_step"],
        micro_batch_size=run["micro"] or 0,
        shuffle="ordered" not in run["mods"],
        lr=a.lr,
        warmup_ratio=a.warmup_ratio,
        weight_decay=0.0,
        grad_clip=1.0,
        max_steps=a.steps,
        seed=a.seed,
        output_dir=str(out),
        log_every=1,
        num_samples=0,
        save_final=False,
        device=a.device,
        dtype="bf16" if a.device == "cuda" else "fp32",
    )
    if run["weights"] in ("lora", "qlora"):
        flat.update({run["weights"]: True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA})
    if "ac" in run["mods"]:
        flat["activation_checkpointing"] = True
    if "eager" in run["mods"]:
        flat["compile"] = "off"
    if run["cap"]:
        flat["max_memory_gib"] = run["cap"]
    return flat


def sftune_run(a, plan: dict, run: dict) -> dict:
    from sftune import config as config_mod
    from sftune.train.loop import train

    out = Path(plan["work"]) / f"sftune_{run['name'].replace('+', '_')}"
    # A fresh packed-data cache per run: the reference pass is computed, not read back.
    os.environ["SFTUNE_CACHE_DIR"] = str(out / "cache")
    cfg = config_mod.from_flat(sftune_flat(a, plan, run, out))
    ref_s = time_reference_pass()
    t0 = time.perf_counter()
    train(cfg)
    wall_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [r for r in rows if "train_loss" in r and "train_seconds" in r and "pairs" in r]
    res = dict(
        side="sftune",
        losses=[r["train_loss"] for r in rows if "train_loss" in r],
        metrics_rows=rows,
        wall_s=wall_s,
        rows_per_step=plan["sftune_rows_per_step"],
        seq_length=a.seq_length,
        peak_gib_logged=max((r.get("peak_mem_gib", 0) for r in rows), default=None),
        reference_s=ref_s[0] if ref_s else None,
    )
    if timed:  # each step's pairs and seconds, from the running totals of the log rows
        before = [{"pairs": 0, "train_seconds": 0.0}, *timed[:-1]]
        res["pairs_per_step"] = [
            b["pairs"] - p["pairs"] for p, b in zip(before, timed, strict=True)
        ]
        res["step_times_s"] = [
            b["train_seconds"] - p["train_seconds"] for p, b in zip(before, timed, strict=True)
        ]
        res["train_s"] = timed[-1]["train_seconds"]
        # pairs trained / (reference pass + training), as for TRL; and over the whole call
        # (model load, compile, packing, reference pass, validation and training)
        if ref_s:
            res["pairs_per_s_with_reference"] = timed[-1]["pairs"] / (res["train_s"] + ref_s[0])
        res["pairs_per_s_wall"] = timed[-1]["pairs"] / wall_s
    return res


def time_reference_pass() -> list[float] | None:
    """Time sftune's reference pass (`objectives.reference.reference_logps`, every call summed into
    the list returned), as the TRL side times its precompute; None where this sftune has none."""
    try:
        from sftune.objectives import reference
    except ImportError:
        return None
    inner = getattr(reference, "reference_logps", None)
    if inner is None:
        return None
    spent = [0.0]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)  # numpy log-probs: the GPU work is done
        spent[0] += time.perf_counter() - t
        return out

    reference.reference_logps = timed
    return spent


# ----------------------------------------------------------------------------- one run


def child(a) -> None:
    """One run in this process (the parent started it with --_run); writes its JSON."""
    import torch

    plan = json.loads(Path(a._plan).read_text())
    if a._run == "model":
        from sftune.llama3_tokenizer import build_llama3_tokenizer

        prepare_model(a, build_llama3_tokenizer(a.tokenizer), Path(plan["model_dir"]))
        return
    run = parse_run(a._run)
    if run["side"] == "trl":
        res = trl_run(a, plan, run)
    else:
        res = sftune_run(a, plan, run)
    cuda = a.device == "cuda"
    res["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    summarize_run(res, a.warmup)
    Path(a._result).write_text(json.dumps(res, indent=1, default=str))


def summarize_run(res: dict, warmup: int) -> None:
    """Steady pairs/s and tokens/s over the steps after `warmup` (the first step, and compiles,
    excluded), from the per-step pairs and times."""
    times, pairs = res.get("step_times_s") or [], res.get("pairs_per_step") or []
    n = min(len(times), len(pairs))
    skip = warmup if n > warmup else 0
    if n:
        t, p = sum(times[skip:n]), sum(pairs[skip:n])
        res["steady_steps"] = n - skip
        res["pairs_per_s"] = p / t if t else None
        res["pairs_per_step_mean"] = sum(pairs[:n]) / n
    res["peak_gib"] = res["peak_memory_bytes"] / 2**30 if res.get("peak_memory_bytes") else None


def launch(a, name: str, plan_path: Path, work: Path) -> dict:
    """Run `name` in a child process (its output goes to the screen); its result or error."""
    result = work / f"result_{name.replace('+', '_')}.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), *a._argv]
    argv += ["--_run", name, "--_plan", str(plan_path), "--_result", str(result)]
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if proc.returncode or not result.is_file():
        return {"error": f"exit status {proc.returncode} (its output is above)", "process_s": wall}
    res = json.loads(result.read_text())
    res["process_s"] = wall
    return res


# ----------------------------------------------------------------------------- report


def table(results: dict, plan: dict) -> list[str]:
    lines = [
        f"{'run':<30} {'pairs/s':>8} {'+ref':>7} {'tok/s fed':>10} {'peak GiB':>9} "
        f"{'pairs/step':>10} {'shape':>12}  losses",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<30} FAILED: {r['error']}")
            continue
        fed = plan["tokens"]["trl_fed_per_pair" if r["side"] == "trl" else "sftune_fed_per_pair"]
        pps = r.get("pairs_per_s")
        shape = (
            f"{r['micro_batch']} x {r['accum']}{' ac' if r['gradient_checkpointing'] else ''}"
            if r["side"] == "trl"
            else f"{r['rows_per_step']} x {r['seq_length']}"
        )
        losses = " ".join(f"{x:.4f}" for x in r.get("losses", [])[:5])
        lines.append(
            f"{name:<30} {_num(pps, '.1f'):>8} {_num(r.get('pairs_per_s_with_reference'), '.1f'):>7} "
            f"{_num(pps and pps * fed, ',.0f'):>10} {_num(r.get('peak_gib'), '.1f'):>9} "
            f"{_num(r.get('pairs_per_step_mean'), '.1f'):>10} {shape:>12}  {losses} ..."
        )
    return lines


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def loss_parity(results: dict) -> dict | None:
    """The per-step losses of the +ordered TRL and sftune runs, side by side."""
    trl_ = next((r for n, r in results.items() if n.startswith("trl") and "+ordered" in n), None)
    sft = next((r for n, r in results.items() if n.startswith("sftune") and "+ordered" in n), None)
    if not trl_ or not sft or "losses" not in trl_ or "losses" not in sft:
        return None
    n = min(len(trl_["losses"]), len(sft["losses"]))
    diffs = [abs(x - y) for x, y in zip(trl_["losses"][:n], sft["losses"][:n], strict=True)]
    # The reward margins too: a loss near ln 2 hides little, the margin shows the step's update.
    theirs = [h["rewards/margins"] for h in trl_.get("log_history", []) if "rewards/margins" in h]
    ours = [r["rewards/margins"] for r in sft.get("metrics_rows", []) if "rewards/margins" in r]
    m = min(len(theirs), len(ours), n)
    return dict(
        steps=n,
        trl=trl_["losses"][:n],
        sftune=sft["losses"][:n],
        max_abs_diff=max(diffs) if diffs else None,
        trl_margins=theirs[:m],
        sftune_margins=ours[:m],
        max_abs_margin_diff=max(
            (abs(x - y) for x, y in zip(theirs[:m], ours[:m], strict=True)), default=None
        ),
        same_pairs_per_step=trl_.get("pairs_per_step", [])[:n] == sft.get("pairs_per_step", [])[:n],
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="llama3.1-8b", help="a course_loop.CONFIGS shape")
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the steady timing")
    ap.add_argument("--pairs-per-step", type=int, default=32, help="TRL's micro x accumulation")
    ap.add_argument("--seq-length", type=int, default=2048, help="sftune's packed row length")
    ap.add_argument("--batch-size", type=int, default=0, help="sftune rows per step; 0: sized")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup-ratio", type=float, default=0.0, help="both sides; then cosine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default=None, help="a {prompt, chosen, rejected} JSONL to use")
    ap.add_argument("--gsm8k", default=None, help="GSM8K train.jsonl: pairs as issue 25 builds")
    ap.add_argument("--num-pairs", type=int, default=0, help="pairs to write; 0: enough")
    ap.add_argument("--val-pairs", type=int, default=8, help="sftune's --val-data: the first N")
    ap.add_argument("--prompt-words", type=int, default=170, help="synthetic prompts (+-20%%)")
    ap.add_argument(
        "--response-words",
        default="150,300",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="MIN,MAX words of a synthetic response",
    )
    ap.add_argument(
        "--trl-ref-batch",
        type=int,
        default=0,
        help="TRL's precompute_ref_batch_size; 0: its default, the micro-batch (a larger one "
        "speeds its reference pass and raises the run's peak memory)",
    )
    ap.add_argument("--tokenizer", default=str(ROOT / "runs/llama3-tokenizer"))
    ap.add_argument("--model-dir", default=None, help="default runs/bench/dpo-model-CONFIG")
    ap.add_argument("--work", default=None, help="run folders; default: next to --out")
    ap.add_argument("--wheels", default=None, help="install what is missing from these wheels")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=str(ROOT / "runs/bench/dpo.json"))
    for hidden in ("--_run", "--_plan", "--_result"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a._argv = [x for x in (argv if argv is not None else sys.argv[1:])]
    return a


def without_wheels(argv: list[str]) -> list[str]:
    """The children get the parent's arguments less --wheels (the parent installed them)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--wheels":
            skip = True
        elif not x.startswith("--wheels="):
            out.append(x)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a._run:
        child(a)
        return None
    runs = [parse_run(n) for n in a.runs.split(",") if n]
    if a.wheels:
        install_wheels(Path(a.wheels), requirements(runs, Path(a.tokenizer)))
        a._argv = without_wheels(a._argv)
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    out = Path(a.out)
    work = Path(a.work) if a.work else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama3_tokenizer(a.tokenizer)
    model_dir = Path(a.model_dir or ROOT / f"runs/bench/dpo-model-{a.config}")
    plan = prepare_data(a, tokenizer, work)
    plan.update(model_dir=str(model_dir), work=str(work))
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    print(
        f"dpo: {plan['num_pairs']:,} pairs, tokens per pair: prompt {plan['tokens']['prompt_mean']:.0f}, "
        f"chosen {plan['tokens']['chosen_mean']:.0f}, rejected {plan['tokens']['rejected_mean']:.0f}; "
        f"TRL feeds {plan['tokens']['trl_fed_per_pair']:.0f}, sftune {plan['tokens']['sftune_fed_per_pair']:.0f}; "
        f"sftune: {plan['packing']['pairs_per_row']:.2f} pairs per row of {a.seq_length}, "
        f"{plan['sftune_rows_per_step']} rows per step = {min(plan['sftune_pairs_per_step'])}-"
        f"{max(plan['sftune_pairs_per_step'])} pairs (TRL: {a.pairs_per_step})",
        flush=True,
    )
    # The model is written by a child too, so this process never holds GPU memory.
    if not saved_model_matches(a, tokenizer, model_dir):
        save = [sys.executable, str(Path(__file__).resolve()), *a._argv, "--_run", "model"]
        if subprocess.run(save + ["--_plan", str(plan_path)]).returncode:
            raise SystemExit("dpo: saving the model failed (see above)")
    results = {
        "config": a.config,
        "args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
        "data": {k: v for k, v in plan.items() if k not in ("texts", "ids", "step_groups")},
        "runs": {},
    }
    for run in runs:
        results["runs"][run["name"]] = launch(a, run["name"], plan_path, work)
        out.write_text(json.dumps(results, indent=1, default=str))  # kept if a later run fails
    results["loss_parity"] = loss_parity(results["runs"])
    out.write_text(json.dumps(results, indent=1, default=str))
    lines = table(results["runs"], plan)
    if results["loss_parity"]:
        lp = results["loss_parity"]
        lines.append(
            f"per-step loss, TRL vs sftune (+ordered): max |diff| {lp['max_abs_diff']:.2e} over "
            f"{lp['steps']} steps (reward margins: {_num(lp['max_abs_margin_diff'], '.2e')}); "
            f"same pairs per step: {lp['same_pairs_per_step']}"
        )
    print("\n".join(lines))
    print(f"dpo: wrote {out}")
    return results


if __name__ == "__main__":
    main()
