"""`sftune.data` is cheap to import: the CLI checks data files before it imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sftune
import sftune.data

SRC = Path(sftune.__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers")


def run_python(code: str) -> str:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_peek_imports_neither_torch_nor_numpy(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Add.", "output": "4"}) + "\n")
    out = run_python(
        "import sys, sftune.data.formats as f\n"
        f"print(f.peek({str(path)!r}))\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules], sorted(sys.modules)\n"
    )
    assert out.strip() == "alpaca"


def test_light_names_of_the_package_stay_light():
    run_python(
        "import sys\n"
        "from sftune.data import IGNORE_INDEX, Record, peek, render_alpaca, parse_fields\n"
        "from sftune.data import ensure_demo_dataset\n"
        "from sftune.data.formats import iter_records\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules], sorted(sys.modules)\n"
        "assert IGNORE_INDEX == -100\n"
    )


def test_heavy_names_load_on_first_use():
    out = run_python(
        "import sys\n"
        "import sftune.data as d\n"
        "assert 'torch' not in sys.modules\n"
        "from sftune.data import PackedSFTDataset, iterate_batches, StepSampler\n"
        "print(PackedSFTDataset.__module__, iterate_batches.__module__, 'torch' in sys.modules)\n"
    )
    assert out.split() == ["sftune.data.packing", "sftune.data.batches", "True"]


def test_all_names_resolve_and_match_the_table():
    assert sftune.data.__all__ == sorted(sftune.data._EXPORTS)
    for name in sftune.data.__all__:
        assert getattr(sftune.data, name) is not None
        assert name in dir(sftune.data)


def test_unknown_name_is_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        sftune.data.no_such_name  # noqa: B018


def test_one_ignore_index():
    from sftune.data.constants import IGNORE_INDEX
    from sftune.objectives import loss

    assert loss.IGNORE_INDEX is IGNORE_INDEX == sftune.data.IGNORE_INDEX == -100
