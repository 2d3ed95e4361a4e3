"""Progress on stderr: a bar in place on a terminal, a line per redraw in a log, and the fold a
long run is training (``catsdogs/util/progress.py``)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import termios
import threading

import pandas as pd
import pytest
import yaml
from conftest import make_kaggle, run_cli

from catsdogs.errors import ConfigError
from catsdogs.util.progress import fold_step, log_interval, progress_bar, step, steps_on


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def test_a_bar_written_to_a_file_is_one_line_per_redraw(monkeypatch):
    monkeypatch.setenv("CATSDOGS_PROGRESS_INTERVAL", "0")  # every redraw
    out = io.StringIO()
    bar = progress_bar(total=3, desc="lite0 features", unit="img", file=out)
    for _ in range(3):
        bar.update()
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = _lines(text)
    # the first state, each update, and the last drawn once although close() draws it again
    assert [re.sub(r" \[.*\]$", "", line) for line in lines] == [
        f"lite0 features: {n}/3 img ({p}%)" for n, p in ((0, 0), (1, 33), (2, 67), (3, 100))]
    assert all(re.search(r" \[\d\d:\d\d<(\?|\d\d:\d\d)\]$", line) for line in lines), lines


def test_a_bar_in_a_file_writes_at_most_one_line_per_interval(monkeypatch):
    monkeypatch.setenv("CATSDOGS_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    bar = progress_bar(total=100, desc="runs", unit="run", file=out)
    for _ in range(100):
        bar.update()
    bar.close()
    # within the hour only its first state, then the last when it closes
    assert [line.split(" [")[0] for line in _lines(out.getvalue())] == [
        "runs: 0/100 run (0%)", "runs: 100/100 run (100%)"]


def test_a_bar_on_a_terminal_redraws_in_place():
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(slave, "w") as tty:
        assert tty.isatty()
        bar = progress_bar(total=2, desc="runs", unit="run", file=tty)
        bar.update(2)
        bar.close()
        tty.flush()
        drawn = b""
        while select.select([master], [], [], 0)[0]:  # what was written is there already
            drawn += os.read(master, 65536)
    os.close(master)
    drawn = drawn.decode()
    assert "\r" in drawn and "2/2" in drawn and "run/s" in drawn  # tqdm's bar, not log lines


def test_a_disabled_bar_writes_nothing_and_steps_go_nowhere():
    out = io.StringIO()
    bar = progress_bar(total=2, desc="runs", unit="run", enabled=False, file=out)
    with steps_on(bar):
        step("run a: fold 1/2")
        bar.update(2)
    bar.close()
    step("outside any bar")  # no bar around it: nothing happens
    assert out.getvalue() == ""


def test_steps_show_on_the_bar_around_them(monkeypatch):
    monkeypatch.setenv("CATSDOGS_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    bar = progress_bar(total=1, desc="runs", unit="run", file=out)
    with steps_on(bar):
        fold_step("lite2__finetune", 2, 5)
        fold_step("lite0__logistic", 0, 1)  # a holdout run has one "fold"
    step("after the block")  # the bar no longer hears steps
    bar.close()
    lines = _lines(out.getvalue())
    assert lines[1].endswith(", lite2__finetune: fold 3/5"), lines
    assert lines[2].endswith(", lite0__logistic: training"), lines
    assert not any("after the block" in line for line in lines)


class _Watched(io.StringIO):
    """A log that sets ``event`` when a line containing ``wanted`` is written to it."""

    def __init__(self, wanted: str) -> None:
        super().__init__()
        self.wanted, self.event = wanted, threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        if self.wanted in text:
            self.event.set()
        return n


def test_a_step_held_back_by_the_interval_is_written_once_it_is_over(monkeypatch):
    """In a log a step that comes within the interval of the last line (a run's first fold,
    just after the bar counted the run before it) is written when the interval is over, not at
    the bar's next update: that may be the end of the run, minutes later (the benchmark's log
    showed no fold of a fine-tuned backbone for 5 min). The newest step is the one written."""
    monkeypatch.setenv("CATSDOGS_PROGRESS_INTERVAL", "2")
    out = _Watched("lite2__finetune: fold 2/5")
    bar = progress_bar(total=2, desc="runs", unit="run", file=out)  # its first line: now
    with steps_on(bar):
        fold_step("lite2__finetune", 0, 5)
        fold_step("lite2__finetune", 1, 5)  # no update of the bar follows
        assert out.event.wait(60), out.getvalue()
    bar.close()
    lines = _lines(out.getvalue())
    assert lines[0].startswith("runs: 0/2 run (0%)") and "], " not in lines[0], lines
    assert lines[1].startswith("runs: 0/2 run (0%)"), lines
    assert lines[1].endswith("], lite2__finetune: fold 2/5"), lines


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv("CATSDOGS_PROGRESS_INTERVAL", raw)
    with pytest.raises(ConfigError, match="CATSDOGS_PROGRESS_INTERVAL") as info:
        log_interval()
    assert repr(raw) in str(info.value) and "unset it" in str(info.value)


def test_the_cli_logs_each_fold_of_each_run_and_the_refit_to_a_file(tmp_path):
    """``catsdogs run`` with stderr a file (a pipe here): lines, no carriage returns, the runs
    bar naming the fold that a group of runs, then a run trained alone, is at, and the refit
    bar the run it refits."""
    data = make_kaggle(tmp_path / "data", n_per_class=12, n_test=4)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "data": str(data), "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
        "weights": "none", "backbones": [{"name": "resnet50", "image_size": 32}],
        "combinations": "all", "heads": ["dropout_sigmoid", "logistic"],
        "optimizers": [{"name": "adam", "learning_rate": 0.01}, "adadelta"],
        "epochs": 2, "batch_size": 16, "seed": 7, "validation": {"kfold": 2}}))
    proc = run_cli("run", str(exp), env={"CATSDOGS_PROGRESS_INTERVAL": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    alone = board.loc[board["head"] == "logistic", "run_id"].item()
    bars = [line for line in proc.stderr.splitlines() if line.startswith(("runs: ", "resnet50 "))]
    assert bars[0].startswith("resnet50 features: 0/28 img (0%)"), bars
    assert any(line.startswith("resnet50 features: 28/28 img (100%)") for line in bars), bars
    steps = [line.split("], ", 1)[1] for line in bars if line.startswith("runs: ") and "], " in line]
    assert steps == ["2 runs trained together: fold 1/2", "2 runs trained together: fold 2/2",
                     f"{alone}: fold 1/2", f"{alone}: fold 2/2"], bars
    assert any(line.startswith("runs: 3/3 run (100%)") for line in bars), bars
    again = run_cli("run", str(exp), "--no-progress", timeout=600)  # every run reused
    assert again.returncode == 0, again.stderr
    assert not any(line.startswith(("runs: ", "refit: ", "resnet50 "))
                   for line in again.stderr.splitlines())

    # a holdout split trains each run once, and the winner is then refitted on every row
    doc = yaml.safe_load(exp.read_text())
    doc.update(validation={"holdout": 0.25}, refit=True, output=str(tmp_path / "out-refit"))
    exp.write_text(yaml.safe_dump(doc))
    proc = run_cli("run", str(exp), env={"CATSDOGS_PROGRESS_INTERVAL": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    steps = [line.split("], ", 1)[1] for line in lines if line.startswith("runs: ") and "], " in line]
    assert steps == ["2 runs trained together: training", f"{alone}: training"], lines
    winner = pd.read_csv(tmp_path / "out-refit" / "leaderboard.csv")["run_id"][0]
    refits = [line for line in lines if line.startswith("refit: ")]
    assert refits[0].startswith("refit: 0/1 run (0%)"), refits
    assert refits[1].startswith("refit: 0/1 run (0%)"), refits
    assert refits[1].endswith(f"], {winner}: training on every row"), refits
    assert refits[-1].startswith("refit: 1/1 run (100%)") and "], " not in refits[-1], refits
