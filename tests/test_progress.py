"""Progress output (cltoolbox.progress): plain lines without carriage returns when stderr is a file, a step bar on
a terminal, and a sweep whose per-run lines and summary table name (and agree on) the time they show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = {
    "name": "tiny",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 50}],
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "seeds": [0],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cltoolbox.cli", *args]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_log_file_gets_one_plain_line_per_experience(tmp_path: Path) -> None:
    err = tmp_path / "stderr.log"
    with open(err, "w") as f:
        proc = subprocess.run(_cmd("run", str(_config(tmp_path)), "--out", str(tmp_path / "runs")),
                              stdout=subprocess.PIPE, stderr=f, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, err.read_text()
    text = err.read_text()
    assert "\r" not in text  # no progress-bar frames in a log file
    lines = [ln for ln in text.splitlines() if "experience" in ln]
    assert len(lines) == 2 * 5  # naive and er, 5 experiences each
    assert re.match(r"^naive seed 0: experience 1/5 done, \d\d:\d\d elapsed, loss [\d.]+; all runs: 1/10 "
                    r"experiences, \d\d:\d\d elapsed, ETA \d\d:\d\d$", lines[0]), lines[0]
    assert lines[-1].startswith("er seed 0: experience 5/5 done") and "all runs: 10/10" in lines[-1]
    assert proc.stdout.splitlines()[0].split()[-2:] == ["wall", "s"]  # the table names its clock


@pytest.mark.slow  # a CLI process each: ~14 s on 2 busy cores
def test_terminal_gets_a_step_bar(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(_cmd("run", str(_config(tmp_path)), "--out", str(tmp_path / "runs"),
                                 "strategy=[{name: naive}]"), stdout=subprocess.DEVNULL, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "step" in text and "all runs" in text  # tqdm bars: the run's steps, the config's ETA
    assert "experience 1/5 done" not in text  # no plain lines on a terminal


def test_sweep_lines_and_table_name_the_same_clock(tmp_path: Path, capsys, one_thread) -> None:
    from cltoolbox.sweep import sweep

    sweep(_config(tmp_path), out=str(tmp_path / "runs"), workers=1)
    out, err = capsys.readouterr()
    assert "\r" not in err
    walls = dict(re.findall(r"\] (\S+) seed 0: ran \(run wall ([\d.]+) s, [\d.]+ s in the worker\), class-IL ACC "
                            r"[\d.]+; sweep \d\d:\d\d elapsed", err))
    assert set(walls) == {"naive", "er"}, err
    table = out.splitlines()
    assert table[0].split()[-2:] == ["wall", "s"]
    for row in table[2:]:
        name, *_, wall = row.split()
        assert wall == walls[name]  # one seed: the table's mean is the line's run wall time
