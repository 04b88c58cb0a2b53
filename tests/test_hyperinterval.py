"""HyperInterval: interval arithmetic is sound, the universal embedding's weights lie in every task's weight
interval, and on a small Permuted-digits stream it forgets far less than naive fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import cltoolbox
from cltoolbox.errors import ConfigError
from cltoolbox.strategies.hyperinterval import (
    HyperIntervalPlugin,
    HyperNet,
    _IntervalOutput,
    interval_linear,
    interval_relu,
)


def test_interval_linear_and_relu_bound_every_point_inside_the_intervals() -> None:
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    wc, wr = torch.randn(5, 6, generator=g), torch.rand(5, 6, generator=g) * 0.3
    bc, br = torch.randn(5, generator=g), torch.rand(5, generator=g) * 0.1
    oc, orad = interval_relu(*interval_linear(c, r, wc, wr, bc, br))
    for _ in range(200):  # random members of the input, weight and bias intervals
        u = lambda m, s: m + s * (2 * torch.rand(m.shape, generator=g) - 1)  # noqa: E731
        y = torch.relu(u(c, r) @ u(wc, wr).T + u(bc, br))
        assert (y >= oc - orad - 1e-5).all() and (y <= oc + orad + 1e-5).all()
    # point intervals give the point result
    pc, pr = interval_linear(c, torch.zeros_like(r), wc, torch.zeros_like(wr), bc, torch.zeros_like(br))
    torch.testing.assert_close(pc, c @ wc.T + bc)
    assert pr.abs().max() == 0


def test_output_layer_gradient_matches_autograd_through_abs() -> None:
    g = torch.Generator().manual_seed(2)
    c = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.rand(7, dtype=torch.float64, generator=g).requires_grad_()  # radii are non-negative
    w = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_IntervalOutput.apply, (c, r, w, b))
    oc, orad = _IntervalOutput.apply(c, r, w, b)
    torch.testing.assert_close(oc, c @ w.T + b)
    torch.testing.assert_close(orad, r @ w.abs().T)


def test_universal_embedding_weights_lie_inside_every_task_weight_interval() -> None:
    plugin = HyperIntervalPlugin(8, [16], radius=2.0, beta=0.0, kappa_min=0.5, inference="universal")
    plugin.hnet = HyperNet(8, [16], [(3, 4), (3,)])
    g = torch.Generator().manual_seed(1)
    plugin.angles = [torch.rand(8, generator=g) * 2 * math.pi for _ in range(4)]
    centre, radius = plugin.universal()
    assert (radius > 0).all()  # the intersection is never empty: every interval contains 0
    w_uni, _ = plugin.hnet(centre, torch.zeros_like(centre))
    for a in plugin.angles:
        e = plugin.embedding(a)
        assert ((e - plugin.rho <= centre) & (centre <= e + plugin.rho)).all()
        c, r = plugin.hnet(e, torch.full_like(e, plugin.rho))
        assert (w_uni >= c - r - 1e-5).all() and (w_uni <= c + r + 1e-5).all()


def _config(strategy: dict) -> dict:
    return {
        "name": "hyperinterval",
        "scenario": {"name": "permuted", "dataset": "digits", "n_experiences": 3},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": strategy,
        "train": {"epochs": 8, "batch_size": 64, "optimizer": "adam", "lr": 0.001},
        "seeds": [0],
    }


def test_schedule_grows_the_radius_over_the_first_half_then_holds_kappa_min() -> None:
    plugin = HyperIntervalPlugin(8, [16], radius=2.0, beta=0.0, kappa_min=0.5, inference="task")
    plugin._n_steps = 100
    seen = []
    for step in (0, 25, 49, 50, 99):
        plugin._step = step
        seen.append(plugin._schedule())
    assert seen[0] == (1.0, 0.0) and seen[1][1] == pytest.approx(25 / 49) and seen[2][1] == 1.0
    assert 0.99 < seen[2][0] < 1.0 and seen[3] == seen[4] == (0.5, 1.0)


def test_hyperinterval_forgets_far_less_than_naive_and_the_embeddings_matter(tmp_path: Path) -> None:
    naive = cltoolbox.run(_config({"name": "naive"}), out=str(tmp_path), quiet=True)[0]["class_il"]
    # the settings of experiments/hyperinterval_check.py: spread centres, a small radius
    summary = cltoolbox.run(_config({"name": "hyperinterval", "inference": "task", "hnet_hidden": [50],
                                     "radius": 0.025, "embedding_scale": 0.3, "beta": 0.5}),
                            out=str(tmp_path), quiet=True)[0]
    task = summary["class_il"]
    assert naive["forgetting"] > 0.1, naive
    assert task["forgetting"] <= naive["forgetting"] / 5, (task, naive)
    assert task["acc"] >= naive["acc"] + 0.1, (task, naive)
    # each task's own embedding beats the universal one: the generated weights depend on the embedding
    assert task["acc"] >= summary["strategy"]["hyperinterval_universal_acc"] + 0.02, summary["strategy"]


def test_task_inference_needs_task_ids_and_the_model_must_be_a_relu_mlp(tmp_path: Path) -> None:
    cfg = _config({"name": "hyperinterval", "inference": "task"})
    cfg["scenario"] = {"name": "class_incremental", "dataset": "digits", "n_experiences": 5}
    with pytest.raises(ConfigError, match="inference"):
        cltoolbox.run(cfg, out=str(tmp_path), quiet=True)
    cfg = _config({"name": "hyperinterval"})
    cfg["model"]["dropout"] = 0.2
    with pytest.raises(ConfigError, match="mlp"):
        cltoolbox.run(cfg, out=str(tmp_path), quiet=True)
