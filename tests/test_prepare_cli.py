"""`sftune prepare`: stats on success; one line on stderr, exit 2 and a clean cache on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftune.cli import main
from sftune.data.formats import parse_fields


@pytest.fixture
def loaded_once(llama3_tokenizer, llama3_tokenizer_dir, monkeypatch):
    """Serve the session's tokenizer instead of loading it again (3 s a load on 2 cores);
    the tests that are about loading use the real `load_tokenizer`."""
    from sftune import models as module

    def load(name):
        assert Path(name) == Path(llama3_tokenizer_dir)
        return llama3_tokenizer

    monkeypatch.setattr(module, "load_tokenizer", load)


def prepare(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_prints_stats_and_caches(llama3_tokenizer_dir, shared, tmp_path, capsys):
    data = shared / "fixtures/cs336/sft_sample.jsonl"
    args = [data, "--tokenizer", llama3_tokenizer_dir, "--seq-length", 32, "--cache-dir", tmp_path]
    code, out, err = prepare(args, capsys)
    assert code == 0 and err == ""
    assert "5 documents" in out and "75 items of 32" in out and "built" in out
    code, out, _ = prepare([*args, "--shuffle", "--seed", 3], capsys)
    assert code == 0 and "from cache" in out and "75 items" in out


def test_prepare_with_field_mapping(loaded_once, llama3_tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "What is 2+2? Explain it well.", "answer": "It is 4."}\n' * 4)
    code, out, _ = prepare(
        [data, "--tokenizer", llama3_tokenizer_dir, "--seq-length", 16]
        + ["--fields", "question=prompt,answer=response", "--response-only"],
        capsys,
    )
    assert code == 0 and "4 documents" in out and "trained tokens" in out


def test_parse_fields():
    assert parse_fields("question=prompt, answer=response") == {
        "prompt": "question",
        "response": "answer",
    }
    assert parse_fields("prompt=question") == {"prompt": "question"}
    for bad in ["question", "a=b", "=prompt"]:
        with pytest.raises(Exception, match="SOURCE=TARGET|names none"):
            parse_fields(bad)


BAD_FILES = {
    "missing.jsonl": None,
    "empty.jsonl": b"\n\n",
    "badjson.jsonl": b'{"prompt": "p", "response": "r"}\n{"prompt": \n',
    "nofield.jsonl": b'{"prompt": "p"}\n',
    "notutf8.jsonl": b'{"prompt": "\xff", "response": "r"}\n',
    "truncated.jsonl.gz": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_is_one_line_and_leaves_no_cache(
    name, loaded_once, llama3_tokenizer_dir, tmp_path, capsys
):
    data = tmp_path / name
    if BAD_FILES[name] is not None:
        data.write_bytes(BAD_FILES[name])
    cache = tmp_path / "cache"
    args = [data, "--tokenizer", llama3_tokenizer_dir, "--seq-length", 8, "--cache-dir", cache]
    code, out, err = prepare(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(data) in err and "Traceback" not in err
    assert not cache.exists() or list(cache.iterdir()) == []


def test_bad_settings(loaded_once, llama3_tokenizer_dir, shared, tmp_path, capsys):
    data = shared / "fixtures/cs336/sft_sample.jsonl"
    code, _, err = prepare([data, "--tokenizer", llama3_tokenizer_dir, "--seq-length", 0], capsys)
    assert code == 2 and "seq_length" in err and str(data) in err


def test_bad_tokenizer_dir(shared, tmp_path, capsys):
    data = shared / "fixtures/cs336/sft_sample.jsonl"
    code, _, err = prepare([data, "--tokenizer", tmp_path / "nope", "--seq-length", 8], capsys)
    assert code == 2 and "nope" in err and len(err.splitlines()) == 1
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    code, _, err = prepare([data, "--tokenizer", tmp_path / "broken", "--seq-length", 8], capsys)
    assert code == 2 and "cannot load the tokenizer" in err and len(err.splitlines()) == 1


def test_real_process_exit_code(tmp_path):
    """The console entry point itself: exit status 2 and one line, no traceback."""
    data = tmp_path / "missing.jsonl"
    cache = tmp_path / "cache"
    env = {**os.environ, "SFTUNE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sftune", "prepare", str(data), "--tokenizer", str(tmp_path)]
        + ["--seq-length", "8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr == f"sftune: error: {data}: no such file\n"
    assert not cache.exists()
