"""Issue 12: the default torch thread count (1, or OMP_NUM_THREADS), and a process's one-off costs kept out of
its first run's timed spans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cltoolbox.cli import main
from cltoolbox.session import default_threads

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "name": "thr",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "seeds": [0],
}


def write(tmp: Path, cfg: dict) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def recorded(out: Path) -> list[int]:
    return [json.loads(p.read_text())["torch_threads"] for p in sorted(out.rglob("env.json"))]


@pytest.fixture
def two_torch_threads():
    """torch's own default on a 2-core machine (2), whatever this machine has: the run must not inherit it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_default_threads_reads_omp_num_threads(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 1
    for value, expected in (("3", 3), ("0", 1), ("4,2", 1), ("", 1), ("x", 1)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert default_threads() == expected


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_run_without_threads_uses_one(command: str, tmp_path: Path, monkeypatch, two_torch_threads) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    extra = ["--workers", "1", "--backend", "local"] if command == "sweep" else []
    if command == "sweep":  # in-process (one worker): the test sees the worker's thread count
        monkeypatch.setattr("cltoolbox.sweep.available_cores", lambda: 2)
    assert main([command, write(tmp_path, CFG), "--out", str(tmp_path / "out"), "-q", *extra]) == 0
    assert recorded(tmp_path / "out") == [1]
    assert torch.get_num_threads() == 2  # the caller's setting is given back


def test_threads_option_and_omp_num_threads(tmp_path: Path, monkeypatch, two_torch_threads) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = write(tmp_path, CFG)
    assert main(["run", cfg, "--out", str(tmp_path / "omp"), "-q"]) == 0
    assert recorded(tmp_path / "omp") == [2]
    torch.set_num_threads(1)
    assert main(["run", cfg, "--out", str(tmp_path / "opt"), "-q", "--threads", "2"]) == 0
    assert recorded(tmp_path / "opt") == [2]
    assert torch.get_num_threads() == 1


def test_first_run_of_a_process_is_not_charged_for_one_off_costs(tmp_path: Path) -> None:
    """Two runs of the same size in one fresh process report about the same CPU and training time. The first
    ``torch.optim`` optimizer of a process imports torch._dynamo (~1.1 s of CPU here); before the warm-up that
    landed in the first run's cpu_s and train_s (a run that trains in ~0.2 s reported ~1.4 s)."""
    cfg = write(tmp_path, {**CFG, "seeds": [0, 1]})
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "cltoolbox.cli", "run", cfg, "--out", str(tmp_path / "out"), "-q"],
                   env=env, check=True, timeout=300)
    runs = {p.parent.name: json.loads(p.read_text())["cost"] for p in (tmp_path / "out").rglob("metrics.json")}
    first, second = runs["seed_0"], runs["seed_1"]
    assert first["cpu_s"] <= 2 * second["cpu_s"] + 0.3, (first, second)
    assert first["train_s"] <= 2 * second["train_s"] + 0.5, (first, second)
