"""Task accuracy through lm-evaluation-harness, offline on CPU: sftune's GSM8K task renders the
prompt sftune trains with, `sftune eval --tasks` runs on a tiny model and a 10-problem file,
training logs the accuracy at the right steps without changing the run, and bad input is one
line that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftune import tasks
from sftune.cli import main
from sftune.data.templates import render_alpaca
from sftune.errors import SftuneError
from sftune.train.metrics import read_metrics
from tiny import chat_model_dir
from trainutil import assert_same_losses, losses, tiny_config


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _eval_args(workdir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(workdir / "model"),
        "--tasks",
        "gsm8k",
        "--task-data",
        f"gsm8k={data}",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_gsm8k_prompt_is_the_alpaca_rendering_sftune_trains_with(gsm8k_jsonl, tmp_path):
    """The task holds the question; under Alpaca sftune wraps it in the training template
    (a bare field name, which lm-eval reads as the record's field, too); under chat the
    chat template gets it as it is."""
    jinja2 = pytest.importorskip("jinja2")
    (spec,) = tasks.resolve_tasks("gsm8k", f"gsm8k={gsm8k_jsonl}")
    cfg = tasks.read_task_yaml(spec.yaml_path)
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    alpaca = tasks.prompt_overrides(spec, "alpaca")["doc_to_text"]
    rendered = jinja2.Template(alpaca, keep_trailing_newline=True).render(question=question)
    assert rendered == render_alpaca(question, "")[0]
    assert tasks.prompt_overrides(spec, "chat") == {}
    assert cfg["doc_to_text"] == "{{question}}"
    assert "### Instruction:" in cfg["generation_kwargs"]["until"]
    assert cfg["num_fewshot"] == 0 and cfg["generation_kwargs"]["max_gen_toks"] == 256
    own = tmp_path / "own.yaml"
    own.write_text("task: own\ndoc_to_text: question\n")
    wrapped = tasks.prompt_overrides(tasks.TaskSpec("own", own, {}), "alpaca")["doc_to_text"]
    assert wrapped == render_alpaca("{{question}}", "")[0]


def test_task_specs_point_lm_eval_at_the_local_file(gsm8k_jsonl, tmp_path):
    (spec,) = tasks.resolve_tasks("gsm8k", f"gsm8k={gsm8k_jsonl}")
    assert spec.overrides == {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(gsm8k_jsonl.resolve())}},
    }
    # A --task-dir task of the same name replaces sftune's; its own data_files are checked.
    (tmp_path / "mine.yaml").write_text(
        "task: gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: nowhere.jsonl}\n"
        "doc_to_text: '{{question}}'\n"
    )
    assert tasks.known_tasks(str(tmp_path))["gsm8k"] == (tmp_path / "mine.yaml").resolve()
    with pytest.raises(SftuneError, match="nowhere.jsonl: no such file"):
        tasks.resolve_tasks("gsm8k", None, str(tmp_path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'; known: gsm8k"),
        (["--task-data", "gsm8k=missing.jsonl"], "missing.jsonl: no such file (--task-data gsm8k)"),
        (["--task-data", ""], "--tasks gsm8k: no local data; add --task-data gsm8k=FILE"),
        (["--task-data", "math=a.jsonl"], "'math' is not one of the tasks asked for"),
        (["--task-data", "BAD"], "expected TASK=FILE"),
        (["--task-dir", "no/such/dir"], "--task-dir no/such/dir: no such directory"),
    ],
)
def test_bad_task_input_is_one_line_and_writes_nothing(
    workdir, gsm8k_jsonl, tmp_path, capsys, flags, message
):
    out = tmp_path / "out"
    args = _eval_args(workdir, gsm8k_jsonl, out)
    for flag in ("--tasks", "--task-data"):  # the test's flag replaces the default one
        if flag in flags:
            i = args.index(flag)
            del args[i : i + 2]
    code, _, err = _main([*args, *flags], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_record_without_the_fields_the_task_reads(workdir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "What is 2 + 2?", "response": "#### 4"}\n')
    code, _, err = _main(_eval_args(workdir, data, tmp_path / "out"), capsys)
    assert code == 2 and "bad.jsonl:1: field 'question': missing" in err, err


@pytest.mark.slow
def test_lm_eval_on_a_tiny_model_and_ten_problems(workdir, gsm8k_jsonl, tmp_path, capsys):
    """`sftune eval --tasks gsm8k` runs lm-eval offline and returns a number, with lm-eval's
    table on the console, eval_results.json, and the Alpaca prompt sent to the model."""
    out = tmp_path / "out"
    extra = ("--max-gen-toks", "24", "--log-samples")
    code, stdout, err = _main(_eval_args(workdir, gsm8k_jsonl, out, *extra), capsys)
    assert code == 0, err
    assert "|Tasks|" in stdout and "strict-match" in stdout and "10 problems in" in stdout
    # No sftune.json and no chat template: Alpaca, said to be a guess, with a warning.
    assert "prompt format alpaca (guessed: no sftune.json, no chat template)" in stdout
    assert "has no sftune.json saying how it was tuned" in err and "--prompt-format" in err
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["sftune"]["prompt_format"] == "alpaca"
    accuracy = saved["results"]["gsm8k"]["exact_match,strict-match"]
    assert 0.0 <= accuracy <= 1.0  # a random tiny model scores 0; the number is what matters
    assert saved["n-samples"]["gsm8k"]["effective"] == 10
    assert saved["configs"]["gsm8k"]["generation_kwargs"]["max_gen_toks"] == 24
    first = json.loads((out / "eval_samples_gsm8k.jsonl").read_text().splitlines()[0])
    question = json.loads(gsm8k_jsonl.read_text().splitlines()[0])["question"]
    assert first["arguments"][0][0] == render_alpaca(question, "")[0]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny ChatML model whose sftune.json says it was tuned on chats, with a system prompt."""
    path = chat_model_dir(tmp_path_factory.mktemp("chat") / "final")
    (path / "sftune.json").write_text(
        json.dumps({"prompt_format": "chat", "seq_length": 32, "system_prompt": "Be exact."})
    )
    return path


@pytest.mark.parametrize(
    "flag, fmt, why", [((), "chat", "tuned with it"), (("alpaca",), "alpaca", "--prompt-format")]
)
def test_task_prompts_follow_the_tuned_format(
    chat_model, gsm8k_jsonl, short_tasks, tmp_path, capsys, flag, fmt, why
):
    """A chat-tuned model gets GSM8K through its chat template (system prompt included), as
    its sftune.json says; --prompt-format alpaca gives the Alpaca prompt; the results and the
    printed line name the choice."""
    out = tmp_path / "out"
    args = ["eval", "--model", str(chat_model), "--tasks", "gsm8k_short", "--task-dir"]
    args += [str(short_tasks), "--task-data", f"gsm8k_short={gsm8k_jsonl}", "--output-dir"]
    args += [str(out), "--limit", "2", "--max-gen-toks", "2", "--log-samples"]
    code, stdout, err = _main([*args, *(("--prompt-format", *flag) if flag else ())], capsys)
    assert code == 0, err
    assert f"prompt format {fmt} ({why}" in stdout
    warned = "was tuned with chat prompts" in err and "scoring it with alpaca ones" in err
    assert warned == (fmt == "alpaca") and err.count("warning") == warned
    saved = json.loads((out / "eval_results.json").read_text())["sftune"]
    assert saved["prompt_format"] == fmt
    rows = [json.loads(line) for line in (out / "eval_samples_gsm8k_short.jsonl").open()]
    questions = [json.loads(line)["question"] for line in gsm8k_jsonl.open()][:2]
    prompts = list(dict.fromkeys(r["arguments"][0][0] for r in rows))  # a row per filter
    if fmt == "chat":
        assert prompts == [
            f"<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
            "<|im_start|>assistant\n"
            for q in questions
        ]
    else:
        assert prompts == [render_alpaca(q, "")[0] for q in questions]


@pytest.mark.slow
def test_training_logs_task_accuracy_at_the_right_steps(
    workdir, gsm8k_jsonl, short_tasks, fp64_run, tmp_path, capsys
):
    """--eval-tasks at the start, every N steps and at the end, in metrics.jsonl, the curve and
    the summary; the run trains exactly as one without task evaluation (fp64)."""
    from sftune.train.loop import train
    from sftune.train.plot import draw_learning_curve

    scored = dict(
        eval_tasks="gsm8k_short",
        task_data=f"gsm8k_short={gsm8k_jsonl}",
        task_dir=str(short_tasks),
        eval_tasks_every=3,
        eval_limit=2,
    )
    capsys.readouterr()
    run = train(tiny_config(workdir, tmp_path / "tasks", **scored)).output_dir
    rows = read_metrics(run)
    key = "task/gsm8k_short/exact_match/strict-match"
    assert [r["step"] for r in rows if key in r] == [0, 3, 4]
    assert all(0.0 <= r[key] <= 1.0 and r["task_eval_seconds"] > 0 for r in rows if key in r)
    assert "task/gsm8k_short/exact_match_stderr/strict-match" in rows[-1]
    fig = draw_learning_curve(rows, tokens_per_step=256)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "task accuracy"] * 2
    stdout = capsys.readouterr().out
    assert "gsm8k_short exact_match (strict-match): 0.0000 (step 0) -> " in stdout
    assert_same_losses(losses(fp64_run), losses(run))  # the same run without tasks


def test_training_scores_tasks_in_the_runs_format(
    chat_model, gsm8k_jsonl, short_tasks, tmp_path, monkeypatch
):
    """A run on chats scores its --eval-tasks through the chat template, with its system
    prompt; --task-prompt-format alpaca overrides that; config.yaml records the choice."""
    from sftune.train import harness
    from sftune.train.loop import train

    chat = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    }
    data = tmp_path / "chats.jsonl"
    data.write_text((json.dumps(chat) + "\n") * 8)
    asked: list[tuple[str, str | None]] = []

    def fake_run_tasks(model, tokenizer, specs, **kw):
        asked.append((kw["prompt_format"], kw["system_prompt"]))
        return {"results": {}}

    monkeypatch.setattr(harness, "run_tasks", fake_run_tasks)
    common = dict(
        model=str(chat_model),
        train_data=str(data),
        val_data=str(data),
        batch_size=2,
        max_steps=1,
        system_prompt="Be exact.",
        eval_tasks="gsm8k_short",
        task_data=f"gsm8k_short={gsm8k_jsonl}",
        task_dir=str(short_tasks),
    )
    run = train(tiny_config(tmp_path, tmp_path / "chat", **common)).output_dir
    assert asked == [("chat", "Be exact.")] * 2  # at the start and at the end
    assert "task_prompt_format: chat" in (run / "config.yaml").read_text()
    asked.clear()
    train(tiny_config(tmp_path, tmp_path / "alpaca", task_prompt_format="alpaca", **common))
    assert asked == [("alpaca", "Be exact.")] * 2
