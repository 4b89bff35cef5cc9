"""Objectives: what a step's loss is, chosen at build time (`preference.build_objective`).

    loss.py        token-weighted cross-entropy, and the chunked linear + log-softmax heads
                   (fused CE; per-token log-probs) that never hold the full logits
    preference.py  DPO, IPO, SimPO, ORPO over per-pair log-probs, and the seam the trainer's
                   step and evaluation call (SFT's cross-entropy and the pair objectives alike)
    reference.py   the reference model's log-probs: one forward-only pass before training,
                   cached with the packed pairs

These change together when an objective is added; the loop, checkpoints and logger stay as
they are (DESIGN: "Objectives and memory techniques: seams, not forks").
"""
