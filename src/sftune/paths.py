"""Where sftune keeps what it derives: converted models, packed token streams, the demo data.

Standard library only, so the data modules can use it without importing torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SFTUNE_CACHE_DIR"


def cache_root() -> Path:
    """`$SFTUNE_CACHE_DIR` if set, else the user's cache directory for sftune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sftune"))
