"""What APER's first-session adapter does to frozen EfficientNet-Lite0 features (Split-MNIST-5k, 96 px).

For each setting, the ``aper`` plugin trains its adapter on the first experience through the standard loop
(``Learner``), then this script measures, on the test set:

* ``move``: relative change of the features, mean ||phi*(x) - phi(x)|| / ||phi(x)||;
* ``grad``: the norm of the adapter's gradient at its first step (how much signal the cosine head sends);
* nearest-prototype (cosine) accuracy with prototypes from the training data, for the pre-trained features
  ``phi``, the adapted ones ``phi*`` and APER's concatenation ``[phi, phi*]``, over the first session's
  classes (``first``), the later classes only (``later``) and all classes (``all``);
* ``fisher``: between-class / within-class variance ratio (trace) of all ten classes, phi vs phi*.

``all`` with the concatenation is the class-IL accuracy APER reaches at the end of the stream; ``all`` with
phi is SimpleCIL's. Settings: the plugin's defaults (the paper's adapter: bottleneck 64, scale 0.1,
SGD momentum 0.9, lr 0.01, batch 48, 20 epochs), larger adapter learning rates and scales, and larger
first sessions (``first_classes``), one seed each.

    python experiments/aper_diagnose.py --features /tmp/lite0_feats.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cltoolbox.data.base import Dataset
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parent))


def nearest_prototype(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor,
                      classes: list[int]) -> float:
    """Cosine nearest-class-mean accuracy among ``classes`` (test samples of those classes only)."""
    cls = torch.tensor(classes)
    protos = torch.stack([ftr[ytr == c].mean(0) for c in classes])
    keep = torch.isin(yte, cls)
    sim = F.normalize(fte[keep], dim=1) @ F.normalize(protos, dim=1).T
    return float((cls[sim.argmax(1)] == yte[keep]).double().mean())


def fisher(f: torch.Tensor, y: torch.Tensor) -> float:
    mu = f.mean(0)
    between = sum(float(((f[y == c].mean(0) - mu) ** 2).sum()) * int((y == c).sum()) for c in y.unique().tolist())
    within = sum(float(((f[y == c] - f[y == c].mean(0)) ** 2).sum()) for c in y.unique().tolist())
    return between / within


def diagnose(data: Dataset, first: int, train: dict, params: dict) -> dict[str, float]:
    n_exp = 1 + (10 - first) // 2 if first < 10 else 1
    stream = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=n_exp, first_classes=first)
    torch.manual_seed(0)
    model = MODELS.get("mlp").factory(stream.input_shape, 10, hidden=[])
    (plugin,) = STRATEGIES.get("aper").factory(**params)
    learner = Learner(model, [plugin], TrainConfig(**train), seed=0)
    learner.begin(stream)
    grads: list[float] = []
    hook = plugin.adapter.up.weight.register_hook(lambda g: grads.append(float(g.norm())) if not grads else None)
    learner.train_experience(stream.experiences[0])
    hook.remove()
    with torch.no_grad():
        ftr, fte = data.x_train, data.x_test
        atr, ate = plugin.adapter(ftr), plugin.adapter(fte)
    ytr, yte = data.y_train, data.y_test
    firsts, later, every = list(range(first)), list(range(first, 10)), list(range(10))
    out = {"move": float(((ate - fte).norm(dim=1) / fte.norm(dim=1)).mean()), "grad": grads[0],
           "fisher_phi": fisher(fte, yte), "fisher_adapted": fisher(ate, yte)}
    for name, (a, b) in {"phi": (ftr, fte), "adapted": (atr, ate),
                         "concat": (torch.cat((ftr, atr), 1), torch.cat((fte, ate), 1))}.items():
        for part, classes in (("first", firsts), ("later", later), ("all", every)):
            if classes:
                out[f"{name}_{part}"] = nearest_prototype(a, ytr, b, yte, classes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True, help=".pt file of pretrained_more_check --features")
    args = parser.parse_args()
    torch.set_num_threads(1)
    f = torch.load(args.features, weights_only=True)
    data = Dataset.from_tensors("mnist5k_lite0", f["ftr"], f["ytr"], f["fte"], f["yte"], 10)
    paper = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01, "epochs": 20, "batch_size": 48}
    settings = [
        ("paper defaults, 2-class first session", 2, paper, {}),
        ("+ weight decay 5e-4, cosine lr", 2, {**paper, "weight_decay": 5e-4, "scheduler": "cosine"}, {}),
        ("lr 0.1", 2, {**paper, "lr": 0.1}, {}),
        ("adapter scale 1.0", 2, paper, {"adapter_scale": 1.0}),
        ("lr 0.1, adapter scale 1.0", 2, {**paper, "lr": 0.1}, {"adapter_scale": 1.0}),
        ("lr 1.0, adapter scale 1.0", 2, {**paper, "lr": 1.0}, {"adapter_scale": 1.0}),
        ("paper defaults, 4-class first session", 4, paper, {}),
        ("paper defaults, 6-class first session", 6, paper, {}),
        ("adapter scale 1.0, 6-class first session", 6, paper, {"adapter_scale": 1.0}),
        ("lr 0.1, scale 1.0, 6-class first session", 6, {**paper, "lr": 0.1}, {"adapter_scale": 1.0}),
    ]
    cols = ["move", "grad", "phi_first", "adapted_first", "phi_later", "adapted_later", "phi_all", "adapted_all",
            "concat_all", "fisher_phi", "fisher_adapted"]
    print(f"{'setting':<42} " + " ".join(f"{c:>13}" for c in cols))
    for name, first, train, params in settings:
        r = diagnose(data, first, train, params)
        print(f"{name:<42} " + " ".join(f"{r.get(c, float('nan')):>13.4g}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
