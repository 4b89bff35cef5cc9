"""ConsoleProgress and its validation sub-bar (fast, CPU)."""

from __future__ import annotations

from sftune.train.progress import ConsoleProgress


def test_console_progress_shows_postfix_and_writes(capsys):
    bar = ConsoleProgress(total_steps=4, initial=1)
    bar.update(train_loss=1.2345678, lr=2e-5, tokens_per_s=41000.0)
    bar.write("saved checkpoint")
    bar.update(2)
    bar.close()
    out, err = capsys.readouterr()
    assert "saved checkpoint" in out
    assert "loss=1.235" in err and "lr=2.000e-05" in err and "tok/s=41000" in err
    assert "4/4" in err


def test_console_progress_disabled_prints_nothing(capsys):
    bar = ConsoleProgress(total_steps=4, enabled=False)
    bar.update(train_loss=1.0)
    bar.write("hidden")
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_eval_bar_counts_batches_under_the_step_bar(capsys):
    bar = ConsoleProgress(total_steps=4)
    with bar.eval_bar(3) as val:
        for _ in range(3):
            val.update()
    assert val.n == 3
    bar.update(4)
    bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "validation:" in err and "0/3" in err and "batch" in err
    assert "4/4" in err


def test_eval_bar_disabled_prints_nothing_but_counts(capsys, monkeypatch):
    for bar in (ConsoleProgress(total_steps=4, enabled=False), _on_rank(1, monkeypatch)):
        with bar.eval_bar(5, desc="val") as val:
            val.update(2)
            val.update()
        assert val.n == 3
        bar.close()
    assert capsys.readouterr() == ("", "")


def _on_rank(rank, monkeypatch):
    monkeypatch.setenv("RANK", str(rank))
    return ConsoleProgress(total_steps=4)
