"""The Avalanche cross-check (experiments/compare_avalanche.py) on its smallest case: Split-MNIST-5k, seed 0,
naive and si. Checks that both libraries get the same data and the same initial weights, that their naive
results agree, and documents Avalanche 0.6.0's inactive SI on CPU (about 10 s, most of it importing Avalanche).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("avalanche")

PATH = Path(__file__).resolve().parents[1] / "experiments" / "compare_avalanche.py"


@pytest.fixture(scope="module")
def ca():
    spec = importlib.util.spec_from_file_location("compare_avalanche", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_same_data_and_initial_model(ca, tmp_path):
    from cltoolbox import config as cfgmod
    from cltoolbox.build import build_model, build_stream
    from cltoolbox.data import load_dataset

    base = ca.resolved_config("split", {"name": "naive"}, str(tmp_path))
    stream = build_stream(base, load_dataset("mnist5k"), 0)
    bm = ca.avalanche_benchmark("split", stream)
    for ours, theirs in zip(stream, bm.train_stream, strict=True):
        x = torch.stack([theirs.dataset[i][0] for i in range(len(theirs.dataset))])
        assert x.shape == ours.x_train.shape
        assert ca.origin_counts(x, stream)[ours.index] == ours.n_train  # every input is one of this experience's
    run_cfg = cfgmod.run_config(base, base["strategy"][0], 0)
    torch.manual_seed(0)
    reference = build_model(run_cfg, stream).state_dict()  # what execute_run trains
    given = ca.initial_model(run_cfg, stream, 0).state_dict()
    assert all(torch.equal(reference[k], given[k]) for k in reference)


@pytest.mark.slow
def test_naive_agrees_and_avalanche_si_is_inactive_on_cpu(ca):
    import avalanche

    result = ca.compare(["naive", "si"], [0], ["split"], si_patch=False, log=lambda s: None)
    naive = ca.summarise(result["runs"], "split", "naive")
    assert abs(naive["delta"]) <= 2.0
    run = next(r for r in result["runs"] if r["strategy"] == "naive")
    assert run["ours"].steps == run["theirs"].steps == 400
    if avalanche.__version__ != "0.6.0":
        pytest.skip(f"the SI finding is about Avalanche 0.6.0, installed {avalanche.__version__}")
    (si,) = result["diag"]["si"]
    assert all(si["aliased"].values())  # snapshots are views of the live parameters on CPU
    assert si["imp_max"] == si["imp_min"] == 0.0 and si["traj_absmax"] == 0.0
    assert result["diag"]["si_vs_naive"][0]["identical"]  # bit-for-bit Naive
    assert si["ours_omega_max"] > 0  # cltoolbox's SI measures importances
