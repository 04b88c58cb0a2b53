"""``scenario: {name: avalanche, benchmark: "module:function"}``: an Avalanche nc_benchmark (built by the user's
function from MNIST-5k tensors) trained with cltoolbox's ``er`` from a config alone, with no dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cltoolbox.config import validate
from cltoolbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "avalanche_er_mnist5k.yaml"


def test_avalanche_scenario_validation(tmp_path: Path) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    resolved = validate(cfg)
    assert resolved["scenario"]["dataset"] is None  # the benchmark brings its data
    with pytest.raises(ConfigError, match="scenario.dataset: the avalanche scenario builds its own data"):
        validate({**cfg, "scenario": {**cfg["scenario"], "dataset": "mnist5k"}})
    with pytest.raises(ConfigError, match="scenario.benchmark: missing"):
        validate({**cfg, "scenario": {"name": "avalanche"}})

    from cltoolbox.build import build_stream

    bad = {"name": "avalanche", "benchmark": "no_module_here:build"}
    with pytest.raises(ConfigError, match="scenario.benchmark: cannot import module 'no_module_here'"):
        build_stream(validate({**cfg, "scenario": bad}), None, 0)
    user = tmp_path / "bench.py"
    user.write_text("def build(seed):\n    return 42\n")
    for spec, msg in ((f"{user}:nothing", "has no function 'nothing'"), (f"{user}", "expected 'module:function'"),
                      (f"{user}:build", "returned a int, not an Avalanche benchmark")):
        with pytest.raises(ConfigError, match=msg):
            build_stream(validate({**cfg, "scenario": {"name": "avalanche", "benchmark": spec}}), None, 0)


@pytest.mark.slow  # Avalanche's import and nc_benchmark: 10-25 s on 2 busy cores
def test_nc_benchmark_trained_with_er_from_the_config(tmp_path: Path, monkeypatch) -> None:
    from cltoolbox.cli import main

    monkeypatch.chdir(ROOT)  # the config names experiments/avalanche_nc_mnist5k.py relative to the repository
    code = main(["run", str(CONFIG), "--out", str(tmp_path), "--seeds", "0", "-q", "model.hidden=[100]",
                 "strategy=[{name: er, memory_size: 200}]"])
    assert code == 0
    (run,) = tmp_path.glob("avalanche_er_mnist5k/er/*/seed_0")
    assert run.parent.name == "avalanche-build"
    stream = json.loads((run / "stream.json").read_text())
    assert len(stream["experiences"]) == 5 and stream["scenario"] == "class_incremental"
    assert all(len(e["classes"]) == 2 and e["n_train"] == 800 and e["n_test"] == 200 for e in stream["experiences"])
    classes = [c for e in stream["experiences"] for c in e["classes"]]
    assert sorted(classes) == list(range(10))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "done" and m["labels"]["dataset"] is None
    # ER on a class-IL stream: far above the 1/10 of forgetting everything but the last 2 classes' share
    assert m["class_il"]["acc"] > 0.4, m["class_il"]
