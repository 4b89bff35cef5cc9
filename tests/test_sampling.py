"""Batch sampling for preference pairs: `sftune generate --data FILE --num-samples K --out F`
(sftune.sampling), and scripts/gsm8k_pairs.py, which turns GSM8K samples into pairs.

A tiny random model writes gibberish, but the properties that matter hold exactly: K samples
per record with the source's other fields, the same seed gives the same file, batching (left
padding, each row stopping on its own) does not change greedy answers in fp64, and bad input
is one line that leaves every file as it was."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sftune.cli import main
from tiny import byte_tokenizer, chat_model_dir, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 2+2?", "Add 10 and 5, and then add 7 to that.", "Hi", "Twelve times 7?"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("sampling") / "model", byte_tokenizer())


@pytest.fixture
def gsm8k(tmp_path) -> Path:
    """GSM8K's shape: question and answer, plus an id."""
    path = tmp_path / "train.jsonl"
    rows = [{"question": q, "answer": f"So. #### {i}", "id": i} for i, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _generate(model: Path, data: Path, out: Path, *flags: str) -> int:
    args = ["generate", "--model", str(model), "--data", str(data), "--out", str(out)]
    return main([*args, "--max-new-tokens", "6", "--fields", "question=prompt", *flags])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_k_samples_per_record_with_the_other_fields(model, gsm8k, tmp_path):
    out = tmp_path / "samples.jsonl"
    flags = ["--num-samples", "3", "--temperature", "1", "--batch-size", "4", "--limit", "3"]
    assert _generate(model, gsm8k, out, *flags) == 0
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == QUESTIONS[:3]  # the first 3, in the file's order
    for i, row in enumerate(rows):
        assert len(row["outputs"]) == 3 and all(isinstance(s, str) for s in row["outputs"])
        # question became the prompt; answer (here the response) and id are kept, with the source
        assert row["answer"] == f"So. #### {i}" and row["id"] == i and "question" not in row
        assert row["data_file"] == str(gsm8k) and row["line"] == i + 1
    assert len({s for r in rows for s in r["outputs"]}) > 3  # sampled: not one answer copied
    assert not list(tmp_path.glob(".samples.jsonl.*"))  # no temporary file left behind


def test_the_same_seed_gives_the_same_samples(model, gsm8k, tmp_path):
    flags = ["--num-samples", "2", "--temperature", "1", "--batch-size", "3"]
    files = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c")]
    for out, seed in zip(files, ("1", "1", "2"), strict=True):
        assert _generate(model, gsm8k, out, *flags, "--seed", seed) == 0
    assert files[0].read_text() == files[1].read_text()
    assert files[0].read_text() != files[2].read_text()


def test_batched_greedy_equals_one_at_a_time(model, gsm8k, tmp_path):
    """Left padding is masked and each row's positions start at its own first token: in fp64,
    a prompt's greedy answer does not depend on the prompts batched with it."""
    alone, together = tmp_path / "alone.jsonl", tmp_path / "together.jsonl"
    common = ["--dtype", "fp64", "--max-new-tokens", "12"]
    assert _generate(model, gsm8k, alone, *common, "--batch-size", "1") == 0
    assert _generate(model, gsm8k, together, *common, "--batch-size", "4") == 0
    outputs = [r["outputs"] for r in _rows(alone)]
    assert outputs == [r["outputs"] for r in _rows(together)]
    assert len({o[0] for o in outputs}) == len(QUESTIONS) and all(o[0] for o in outputs)


def test_chat_records_are_asked_their_last_turn_again(tmp_path):
    model = chat_model_dir(tmp_path / "chat")
    convo = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": convo, "topic": "sums"}) + "\n")
    out = tmp_path / "samples.jsonl"
    args = ["generate", "--model", str(model), "--data", str(data), "--out", str(out)]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    (row,) = _rows(out)
    assert row["prompt"] == convo[:3] and row["topic"] == "sums" and "messages" not in row


def test_out_is_never_replaced(model, gsm8k, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    out.write_text("mine\n")
    assert _generate(model, gsm8k, out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--num-samples", "2"], "give --temperature > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--limit", "-1"], "--limit must be >= 0"),
    ],
)
def test_bad_flags_are_one_line(model, gsm8k, tmp_path, capsys, flags, message):
    out = tmp_path / "samples.jsonl"
    assert _generate(model, gsm8k, out, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sampling_flags_need_data(model, capsys):
    assert main(["generate", "--model", str(model), "--prompt", "x", "--num-samples", "2"]) == 2
    assert "--num-samples needs --data FILE" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--data", "x.jsonl"]) == 2
    assert "give --out FILE" in capsys.readouterr().err


def test_a_bad_record_stops_before_the_model_loads(tmp_path, capsys):
    model = tmp_path / "no-model"  # never reached: the data is checked first
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n{"answer": "c"}\n')
    out = tmp_path / "samples.jsonl"
    assert _generate(model, data, out) == 2
    assert f"{data}:2: field 'question': missing" in capsys.readouterr().err
    data.write_text('{"question": "a", "outputs": "mine"}\n')
    assert _generate(model, data, out) == 2
    assert f"{data}:1: field 'outputs': the samples file has its own" in capsys.readouterr().err
    assert not out.exists()


def test_prompts_alone(model, tmp_path):
    """Sampling needs no response: a file of prompts (or Alpaca instructions) is enough."""
    for record in ({"prompt": "2+2?"}, {"instruction": "Add.", "input": "2+2"}):
        data, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
        data.write_text(json.dumps(record) + "\n")
        out.unlink(missing_ok=True)
        assert (
            main(["generate", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
        )
        assert _rows(out)[0]["prompt"] == ("2+2?" if "prompt" in record else "Add.\n\n2+2")


# ----------------------------------------------------------------------------- gsm8k_pairs.py


@pytest.fixture(scope="module")
def pairs():
    spec = importlib.util.spec_from_file_location("gsm8k_pairs", ROOT / "scripts/gsm8k_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_by_the_final_answer(pairs, tmp_path):
    gold = "48/2 = <<48/2=24>>24 ... #### 1,072"
    rows = [
        # a correct sample (strict-match: "1,072." reads as 1072) and wrong ones
        {"prompt": "q1", "outputs": ["x #### 5", "y #### 1,072.", "no answer"], "answer": gold},
        # none correct: the gold answer is chosen, the first wrong sample rejected
        {"prompt": "q2", "outputs": ["#### 7", "#### 8"], "answer": "#### 9", "id": 2},
        # none wrong: skipped
        {"prompt": "q3", "outputs": ["a #### 3", "b #### 3"], "answer": "#### 3"},
        # a chat prompt: the conversational pair form
        {"prompt": [{"role": "user", "content": "q4"}], "outputs": ["#### 1"], "answer": "#### 2"},
    ]
    out = tmp_path / "pairs.jsonl"
    counts = pairs.build(_samples(tmp_path / "samples.jsonl", rows), out)
    assert counts == {"questions": 4, "pairs": 3, "sampled": 1, "gold": 2, "skipped": 1}
    assert _rows(out) == [
        {"prompt": "q1", "chosen": "y #### 1,072.", "rejected": "x #### 5"},
        {"prompt": "q2", "chosen": "#### 9", "rejected": "#### 7"},
        {
            "prompt": [{"role": "user", "content": "q4"}],
            "chosen": [{"role": "assistant", "content": "#### 2"}],
            "rejected": [{"role": "assistant", "content": "#### 1"}],
        },
    ]
    assert pairs.final_answer("#### -3.5 and #### 4") == "-3.5"  # the first match
    assert pairs.final_answer("$1,000") is None  # no "#### N": wrong under strict-match


def test_pairs_refuse_the_test_split_and_bad_rows(pairs, tmp_path, capsys):
    row = {"prompt": "q", "outputs": ["#### 1"], "answer": "#### 2"}
    out = tmp_path / "pairs.jsonl"
    test_file = _samples(tmp_path / "gsm8k_test.jsonl", [row])
    assert pairs.main([str(test_file), str(out)]) == 2
    assert "named like a test split" in capsys.readouterr().err
    from_test = _samples(tmp_path / "samples.jsonl", [{**row, "data_file": "gsm8k/test.jsonl"}])
    assert pairs.main([str(from_test), str(out)]) == 2
    assert "samples.jsonl:1: sampled from gsm8k/test.jsonl" in capsys.readouterr().err
    no_gold = _samples(tmp_path / "nogold.jsonl", [{"prompt": "q", "outputs": ["#### 1"]}])
    assert pairs.main([str(no_gold), str(out)]) == 2
    assert "nogold.jsonl:1: answer: missing (give --gold-field)" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("mine\n")
    good = _samples(tmp_path / "good.jsonl", [row])
    assert pairs.main([str(good), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"


def test_each_prompt_is_rendered_as_trained_and_gets_its_own_answers(
    model, gsm8k, tmp_path, monkeypatch
):
    """The model sees each prompt in the Alpaca template (as `sftune train` rendered it), and
    each row gets the answers to its own prompt although the rows are generated longest first."""
    from sftune.data.templates import render_alpaca
    from sftune.train import generate as gen_mod

    batches: list[int] = []

    def echo(module, tokenizer, prompts, **kw):  # answers each prompt with its own text
        batches.append(len(prompts))
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]

    monkeypatch.setattr(gen_mod, "generate_batch", echo)
    out = tmp_path / "samples.jsonl"
    flags = ["--num-samples", "2", "--temperature", "1", "--batch-size", "3"]
    assert _generate(model, gsm8k, out, *flags) == 0
    assert batches == [3, 3, 2]
    for row, question in zip(_rows(out), QUESTIONS, strict=True):
        assert row["outputs"] == [render_alpaca(question, "")[0]] * 2


def test_an_interrupt_leaves_no_file(model, gsm8k, tmp_path, monkeypatch):
    from sftune.train import generate as gen_mod

    calls: list[int] = []

    def interrupted(module, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ["x"] * len(prompts)

    monkeypatch.setattr(gen_mod, "generate_batch", interrupted)
    out = tmp_path / "samples.jsonl"
    assert _generate(model, gsm8k, out, "--batch-size", "2") == 130
    assert calls == [2, 2] and not out.exists() and not list(tmp_path.glob(".samples*"))
