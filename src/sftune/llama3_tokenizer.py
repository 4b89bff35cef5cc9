"""Build the Meta-Llama-3-8B tokenizer offline, from the `tokenizer.model` in `llama-models`.

The Llama 3 tokenizer is tiktoken BPE (128,000 merges) plus 256 special tokens at ids
128000..128255. The PyPI package `llama-models==0.3.0` ships the BPE file, so the tokenizer
can be rebuilt without the (gated) Hugging Face hub:

    >>> tok = build_llama3_tokenizer("/tmp/llama3-tokenizer")  # doctest: +SKIP
    >>> tok("Below is an instruction that describes a task.").input_ids  # doctest: +SKIP
    [128000, 39314, 374, 459, 7754, 430, 16964, 264, 3465, 13]

`<|begin_of_text|>` (128000) is the BOS that the post-processor prepends, and
`<|end_of_text|>` (128001) is the EOS. The saved directory loads with
`AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sftune.errors import SftuneError

# The pre-tokenizer split of Llama 3 (`Tokenizer.pat_str` in llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Copied from llama_models/llama3/tokenizer.py (llama-models 0.3.0), in id order from 128000.
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
NUM_BASE_TOKENS = 128_000


def llama3_model_file() -> Path:
    """The path of `llama_models/llama3/tokenizer.model`, found without importing the package.

    Importing `llama_models` may pull heavy dependencies; `find_spec` only locates it.
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise SftuneError(
            "the Llama 3 tokenizer needs the package llama-models: pip install llama-models==0.3.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise SftuneError(f"llama-models is installed but has no {path}")
    return path


def _convert(model_file: Path):
    """The `tokenizers.Tokenizer`: BPE + Llama 3 split + special tokens + BOS post-processor."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(model_file),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=LLAMA3_SPECIAL_TOKENS,
    ).converted()
    bos_id = backend.token_to_id(BOS_TOKEN)
    if bos_id != NUM_BASE_TOKENS:  # the special tokens must sit right after the 128,000 BPE ids
        raise SftuneError(f"unexpected Llama 3 vocabulary: {BOS_TOKEN} has id {bos_id}")
    # Same post-processor as Meta's tokenizer.json: byte-level offsets, then BOS in front.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return backend


def build_llama3_tokenizer(out_dir: str | Path | None = None):
    """Build (or, when `out_dir` already holds one, load) the Llama 3 tokenizer.

    With `out_dir`, the tokenizer is saved there with `save_pretrained`, so the next call
    (and `AutoTokenizer.from_pretrained(out_dir)`) loads it in well under a second instead
    of rebuilding the merges (several seconds).

        >>> tok = build_llama3_tokenizer()  # doctest: +SKIP
        >>> tok.bos_token_id, tok.eos_token_id, len(tok)  # doctest: +SKIP
        (128000, 128001, 128256)
    """
    from transformers import PreTrainedTokenizerFast

    if out_dir is not None and (Path(out_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_convert(llama3_model_file()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
