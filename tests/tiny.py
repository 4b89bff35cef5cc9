"""Tiny models and a byte tokenizer for the tests, built in code in milliseconds (no download).

    from tiny import build_tiny_model, byte_tokenizer, tiny_model_dir

    tok = byte_tokenizer()
    model_dir = tiny_model_dir(tmp_path / "tiny", tok)
    model, tok2, info = load_model_and_tokenizer(str(model_dir), device=torch.device("cpu"))

Test helpers live here, not in the package. The tests import this module by name: pytest puts
tests/ on sys.path because tests/ holds a conftest.py and no __init__.py ("prepend" import mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"


def build_tiny_model(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position: int = 2048,
    seed: int = 0,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialized Llama (fp32 unless `dtype` says otherwise), small enough for unit
    tests. The weights are drawn in the default dtype (fp32) and then cast, so a seed gives the
    same model in every dtype."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    # fork_rng: the seed makes the weights reproducible without moving the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _byte_level_core() -> Tokenizer:
    """A BPE over the 256 byte symbols with no merges: one token per byte, ids 0..255."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sort by the byte each symbol stands for, so token id == byte value (easy to reason about).
    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    vocab = {ch: byte_of[ch] for ch in sorted(alphabet, key=byte_of.__getitem__)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting is needed when every byte is its own token.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS, EOS, PAD])
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return core


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the bytes 0..255, indexed by byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_tokenizer(tmpdir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer: bytes 0..255, then bos, eos, pad.

    Encoding prepends bos; eos is never added (packing appends it). With `tmpdir`, the
    tokenizer is also saved there with save_pretrained (loadable with AutoTokenizer).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_core(), bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    if tmpdir is not None:
        tokenizer.save_pretrained(str(tmpdir))
    return tokenizer


def tiny_model_dir(path: str | Path, tokenizer: PreTrainedTokenizerFast, **model_kwargs) -> Path:
    """Save a tiny random Llama sized to `tokenizer` plus the tokenizer into `path`."""
    path = Path(path)
    model = build_tiny_model(len(tokenizer), **model_kwargs)
    # The config carries the special ids so generate() stops at eos without extra arguments.
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A ChatML template (SmolLM2's layout) that also writes the tools, for a tiny chat model.
CHATML = (
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_model_dir(path: str | Path) -> Path:
    """`tiny_model_dir` with the byte tokenizer and the CHATML template: a tiny chat model."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML
    return tiny_model_dir(path, tokenizer)
