"""Where sftune keeps what it derives: converted models, packed token streams, the demo data.

Standard library only (no platformdirs): the data modules and the CLI's early checks use it
before torch or transformers are imported, and a GPU image without extra packages runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SFTUNE_CACHE_DIR"


def cache_root() -> Path:
    """`$SFTUNE_CACHE_DIR` if set, else `$XDG_CACHE_HOME/sftune`, else `~/.cache/sftune`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sftune"
