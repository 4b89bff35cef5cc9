"""benchmarks/memprofile.py (issue 26): the live tensors at a step's peak, by allocating frame,
from the allocator's event trace; its CPU --dry mode on a tiny Llama."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
memprofile = pytest.importorskip("memprofile")


def _frames(*where):
    return [{"filename": f, "line": line, "name": name} for f, line, name in where]


TORCH = ("/site-packages/torch/nn/modules/module.py", 1, "_call_impl")
MLP = ("/site-packages/transformers/models/llama/modeling_llama.py", 164, "forward")
LOSS = ("/src/sftune/objectives/loss.py", 79, "backward")


def test_the_live_set_at_the_peak_is_replayed_from_the_events():
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": _frames(TORCH, MLP)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": _frames(LOSS)},
        {"action": "free_requested", "addr": 1},
        {"action": "free_completed", "addr": 1},  # the same free, once the stream is done
        {"action": "alloc", "addr": 1, "size": 30, "frames": _frames(MLP)},  # reused address
        {"action": "free_requested", "addr": 99},  # allocated before the trace began
        {"action": "alloc", "addr": 3, "size": 60, "frames": _frames(TORCH, MLP)},
        {"action": "free_requested", "addr": 2},
    ]
    peak, live = memprofile.live_at_peak(events)
    assert peak == 150  # 100 + 50, not the later 30 + 50 + 60 = 140
    assert sorted(a["addr"] for a in live) == [1, 2] and {a["size"] for a in live} == {100, 50}
    # Without the frees, the peak is the end: 100 + 50 + 30 + 60.
    allocs = [e for e in events if e["action"] == "alloc"]
    allocs[2] = {**allocs[2], "addr": 4}
    peak, live = memprofile.live_at_peak(allocs)
    assert peak == 240
    assert memprofile.group(live) == [
        (190, 3, "llama/modeling_llama.py:164 (forward)"),  # torch's own frame skipped
        (50, 1, "objectives/loss.py:79 (backward)"),
    ]
    text = memprofile.table("lora 16K", 16384, 2**30, 150 * 2**20, [(150 * 2**20, 3, "x")])
    assert "peak 1,174.0 MiB at 16,384 tokens" in text and "9.38" in text  # KiB per token


def test_dry_run_prints_the_same_table_on_the_cpu(tmp_path, capsys):
    assert memprofile.main(["--dry", "--seqs", "128", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "memprofile.txt").read_text()
    assert text.strip() in capsys.readouterr().out
    results = json.loads((tmp_path / "memprofile.json").read_text())
    assert [r["name"] for r in results] == ["lora 128 +lora+ac", "full 128 +ac"]
    for r in results:
        assert "error" not in r, r.get("error")
        # Every byte live at the peak is in a row; the rows name the model's own lines.
        assert sum(row["bytes"] for row in r["rows"]) == r["step_peak_bytes"] > 0
        assert any("modeling_llama.py" in row["frame"] for row in r["rows"])
        assert r["before_bytes"] > 0  # the weights (and the full run's AdamW moments)
    lora, full = results
    assert full["before_bytes"] > lora["before_bytes"]  # moments of every weight
    assert "KiB/token" in text and "before the step" in text
