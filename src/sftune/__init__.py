"""sftune: supervised instruction fine-tuning of causal language models.

Packed SFT data (`sftune.data`), a trainer with token-weighted loss and exact resume
(`sftune.train`), one code path from a CPU to many GPUs (torchrun: DDP or FSDP2).
"""

__version__ = "0.1.0"
