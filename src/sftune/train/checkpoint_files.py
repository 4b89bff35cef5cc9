"""A checkpoint directory's file names and its verification against its manifest.

Standard library only, so that the CLI's early checks (`sftune export`'s) import no torch;
the rest of the checkpoint code is train/checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

from sftune.errors import SftuneError
from sftune.files import MANIFEST, verify_manifest

DCP_DIR = "model_optim"  # torch.distributed.checkpoint's directory: model and optimizer
TRAINER = "trainer.json"
RNG = "rng_rank{}.json"


def verify(path: Path, contents: bool = True) -> None:
    """A complete checkpoint: every file its manifest lists is there with its size and
    (`contents`) its SHA-256. One line naming the first file that is not, else."""
    if not path.is_dir():
        raise SftuneError(f"{path}: no such checkpoint directory")
    if not (path / MANIFEST).is_file():
        if (path / "trainer.pt").is_file():
            raise SftuneError(
                f"{path}: a checkpoint of an earlier sftune (trainer.pt, a pickle), which this "
                "version does not read, since unpickling a file can run code: resume or export "
                "it with the sftune that wrote it"
            )
        if not any(path.iterdir()):
            raise SftuneError(f"{path}: empty, not a checkpoint (a save that was cut short?)")
        raise SftuneError(f"{path}: not a sftune checkpoint directory (no {MANIFEST})")
    listed = verify_manifest(path, contents)
    for need in (TRAINER, "config.yaml", f"{DCP_DIR}/.metadata", RNG.format(0)):
        if need not in listed:
            raise SftuneError(f"{path}: not a complete checkpoint ({MANIFEST} lists no {need})")
