"""The generated demo dataset (sftune.data.demo): deterministic, well-formed, validation held out."""

from __future__ import annotations

import json
import re

from sftune.data.demo import CAPITALS, ensure_demo_dataset, write_demo_dataset


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_train=200, n_val=30, seed=0)
    b = write_demo_dataset(tmp_path / "b", n_train=200, n_val=30, seed=0)
    c = write_demo_dataset(tmp_path / "c", n_train=200, n_val=30, seed=1)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_records_are_well_formed(tmp_path):
    train_path, val_path = write_demo_dataset(tmp_path, n_train=300, n_val=40)
    train, val = _read(train_path), _read(val_path)
    assert len(train) == 300 and len(val) == 40
    for record in train + val:
        assert set(record) == {"prompt", "response"}
        assert record["prompt"].strip() and record["prompt"] == record["prompt"].strip()
        assert re.fullmatch(r"The answer is [^\n]+\.", record["response"])


def test_validation_prompts_never_in_training(tmp_path):
    train_path, val_path = write_demo_dataset(tmp_path, n_train=1000, n_val=60)
    val_prompts = [r["prompt"] for r in _read(val_path)]
    assert len(set(val_prompts)) == len(val_prompts)
    assert not set(val_prompts) & {r["prompt"] for r in _read(train_path)}


def test_answers_are_correct(tmp_path):
    train_path, _ = write_demo_dataset(tmp_path, n_train=400, n_val=10)
    checked = 0
    for record in _read(train_path):
        prompt, answer = record["prompt"], record["response"][len("The answer is ") : -1]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with the number\.", prompt):
            assert int(answer) == int(m[1]) + int(m[2])
            checked += 1
        elif m := re.fullmatch(r"Give the capital of (.+)\.", prompt):
            assert answer == CAPITALS[m[1]]
            checked += 1
        elif m := re.fullmatch(r"Sort these numbers ascending: (.+)", prompt):
            assert answer == ", ".join(map(str, sorted(int(x) for x in m[1].split(", "))))
            checked += 1
    assert checked > 20


def test_ensure_demo_dataset_creates_once(tmp_path):
    train_path, val_path = ensure_demo_dataset(tmp_path)
    assert train_path.parent.parent == tmp_path / "data"
    first = train_path.read_bytes()
    mtime = train_path.stat().st_mtime_ns
    again = ensure_demo_dataset(tmp_path)
    assert again == (train_path, val_path)
    assert train_path.stat().st_mtime_ns == mtime and train_path.read_bytes() == first
    # No temp dirs are left behind beside the dataset.
    assert [p.name for p in (tmp_path / "data").iterdir()] == [train_path.parent.name]


def test_ensure_demo_dataset_replaces_an_incomplete_copy(tmp_path):
    train_path, val_path = ensure_demo_dataset(tmp_path)
    expected = val_path.read_bytes()
    val_path.unlink()
    assert ensure_demo_dataset(tmp_path) == (train_path, val_path)
    assert val_path.read_bytes() == expected
    assert [p.name for p in (tmp_path / "data").iterdir()] == [train_path.parent.name]
