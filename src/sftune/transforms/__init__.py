"""Model transforms: what wraps or replaces a model's layers at build time, before compile and
sharding (train/module.py `build_module` applies them in order), and the plan that picks the
memory ones within a cap.

    lora.py      LoRA / QLoRA adapters (peft) on a frozen base; their save, merge and export
    fp8.py       FP8 linears (torchao), tensorwise or rowwise
    tiling.py    the MLP over the sequence in tiles, forward and backward (--tiled-mlp)
    offload.py   checkpointed layers whose inputs wait in pinned CPU memory (--activation-offload)
    memplan.py   which of checkpointing, tiling and offload fit --max-memory-gib, fastest first

These change together (a new memory technique is a transform and a candidate of the plan);
the training loop never asks which of them is on.
"""
