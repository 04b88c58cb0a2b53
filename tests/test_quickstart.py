"""The README's main command, end to end through the installed console script, and what it must show."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cltoolbox

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_cli_writes_runs_and_er_beats_naive(tmp_path: Path) -> None:
    exe = shutil.which("cltoolbox") or f"{sys.executable} -m cltoolbox.cli"
    cmd = [*exe.split(), "run", str(ROOT / "experiments" / "quickstart.yaml"), "--seeds", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].split()[:2] == ["strategy", "seeds"]
    assert [line.split()[0] for line in table[2:]] == ["naive", "er", "joint"]

    runs = {p.parts[-3]: p for p in tmp_path.glob("quickstart/*/*/seed_0")}
    assert set(runs) == {"naive", "er", "joint"}
    acc = {k: json.loads((p / "metrics.json").read_text())["class_il"]["acc"] for k, p in runs.items()}
    # class-IL Split-MNIST: replay must beat fine-tuning by a wide margin; joint is the upper bound
    assert acc["er"] >= acc["naive"] + 0.30
    assert acc["joint"] >= 0.90
    results = cltoolbox.load_results(tmp_path)
    assert len(results["metrics"]) == 3 * 2


@pytest.mark.slow
def test_permuted_naive_forgets_joint_does_not(tmp_path: Path) -> None:
    base = {
        "name": "perm", "scenario": {"name": "permuted", "dataset": "mnist5k", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "strategy": [{"name": "naive"}, {"name": "joint"}],
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.1}, "seeds": [0], "out": str(tmp_path),
    }
    by = {r["labels"]["strategy"]: r["class_il"] for r in cltoolbox.run(base, quiet=True)}
    assert by["naive"]["forgetting"] > 0.05
    assert by["joint"]["forgetting"] == pytest.approx(0.0, abs=1e-12)
    assert by["joint"]["acc"] > by["naive"]["acc"]
