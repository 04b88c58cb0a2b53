"""What the expansion strategies (der_expand, memo, foster) share: a model split into a shared trunk and a
per-task branch, frozen copies of earlier branches, a classifier over their concatenated features, and the
class-balanced classifier finetuning on the exemplar memory.

The trainable (newest) branch is part of ``learner.model`` itself, so the loop's train/eval switches, its
optimizer and its checkpoint cover it; earlier branches are frozen copies (eval mode, no gradients) kept by the
plugin as state dicts, and the unified classifier is a plugin-owned ``nn.Linear`` (``Plugin.parameters``).
``learner.model.head`` is not used by these methods' predictions.

Where the model splits (``Split``):

* ``mlp``: with ``shared=False`` (DER, FOSTER) the branch is the whole body (every hidden layer); with
  ``shared=True`` (MEMO) the trunk is every hidden layer but the last and the branch is the last hidden layer
  (Linear + activation [+ dropout]): on the 2x400 MLP the first 400-unit layer is shared and each task adds a
  400x400 layer.
* ``resnet18_reduced``: with ``shared=False`` the branch is the whole network up to the pooled features; with
  ``shared=True`` the trunk is the stem and the first three stages and the branch is the last stage (its two
  residual blocks) and the pooling, as MEMO's ResNet split (the paper shares the shallow stages, ``Sec. 5``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.plugin import MASKED_LOGIT


def _eval_mode_pre_hook(module: nn.Module, _inputs) -> None:
    module.train(False)  # a frozen trunk's normalisation statistics stay fixed while the model trains


class Split:
    """The trunk (shared) and branch (per task) of ``model``: live modules, not copies."""

    def __init__(self, model: nn.Module, shared: bool) -> None:
        from cltoolbox.models.mlp import MLP
        from cltoolbox.models.resnet import ReducedResNet18

        if isinstance(model, MLP):
            layers = list(model.body)
            last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
            cut = last if shared else 0
            self.trunk = nn.Sequential(*layers[:cut])
            self.branch = nn.Sequential(*layers[cut:])
        elif isinstance(model, ReducedResNet18):
            stem = [model.conv1, model.bn1, nn.ReLU()]
            stages = list(model.stages)
            cut = len(stages) - 2 if shared else 0  # the last stage: its two BasicBlocks
            pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if shared:
                self.trunk = nn.Sequential(*stem, *stages[:cut])
                self.branch = nn.Sequential(*stages[cut:], *pool)
            else:
                self.trunk = nn.Sequential()
                self.branch = nn.Sequential(*stem, *stages, *pool)
        else:
            raise ConfigError(f"model: expansion strategies split mlp and resnet18_reduced into shared and per-task "
                              f"blocks, not {type(model).__name__}; use model.name: mlp or resnet18_reduced")
        self.dim = int(model.head.in_features)
        self._frozen_trunk = False

    def freeze_trunk(self) -> None:
        """Freeze the trunk (MEMO after its first task): no gradients, normalisation in eval mode."""
        if self._frozen_trunk or len(self.trunk) == 0:
            return
        self.trunk.requires_grad_(False)
        for m in self.trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(_eval_mode_pre_hook)
        self._frozen_trunk = True

    def frozen_copy(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """An eval-mode, gradient-free copy of the branch (with ``state`` loaded, when given)."""
        branch = copy.deepcopy(self.branch)
        if state is not None:
            branch.load_state_dict(state)
        return branch.eval().requires_grad_(False)

    def trunk_params(self) -> int:
        return sum(p.numel() for p in self.trunk.parameters())

    def branch_params(self) -> int:
        return sum(p.numel() for p in self.branch.parameters())


class UnitGates:
    """DER's mask-based pruning of an mlp branch (Yan et al. 2021, Sec. 3.3, after HAT, Serra et al. 2018): each
    hidden unit of the live branch gets a learnable gate m = sigmoid(s * e), multiplied into the unit's output;
    s is annealed within every epoch from 1 / s_max to s_max (so the gates end near binary), and the sparsity loss
    sum_l ||m_{l-1}||_1 ||m_l||_1 / sum_l c_{l-1} c_l (the fraction of the branch's weights still in use) pushes
    them shut (with HAT's gradient compensation and bounds on e). After the experience, units with e <= 0 are
    pruned: their rows (and bias) of the layer are zeroed, so the frozen copy computes exactly what the binary mask
    would, and only the kept weights are counted."""

    def __init__(self, branch: nn.Sequential, s_max: float, device: torch.device) -> None:
        self.layers = [m for m in branch if isinstance(m, nn.Linear)]
        # open at the start (sigmoid(s_max * 0.5) ~ 1 when annealed), like a fresh extractor
        self.e = [torch.full((m.out_features,), 0.5, device=device, requires_grad=True) for m in self.layers]
        self.s_max = s_max
        self.s = s_max

    def compensate(self) -> None:
        """HAT's gradient compensation: the gates' gradients scaled by s_max (cosh(s e) + 1) / (s (cosh(e) + 1)),
        so that annealing s does not leave them vanishing (sigmoid' of s e is ~0 except near e = 0)."""
        with torch.no_grad():
            for e in self.e:
                if e.grad is not None:
                    num = torch.cosh(torch.clamp(self.s * e, -50, 50)) + 1
                    e.grad.mul_(self.s_max / self.s * num / (torch.cosh(e) + 1))

    def clamp(self) -> None:
        with torch.no_grad():
            for e in self.e:
                e.clamp_(-6, 6)  # HAT's bound: sigmoid(s_max * 6) is 1 in float32 already

    def anneal(self, batch: int, n_batches: int) -> None:
        lo = 1 / self.s_max
        self.s = lo + (self.s_max - lo) * batch / max(1, n_batches - 1)

    def masks(self) -> list[torch.Tensor]:
        return [torch.sigmoid(self.s * e) for e in self.e]

    def forward(self, branch: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        masks, i = self.masks(), 0
        for m in branch:
            h = m(h)
            if isinstance(m, nn.Linear):  # gate >= 0: relu(z) * m == relu(z * m)
                h = h * masks[i]
                i += 1
        return h

    def sparsity(self) -> torch.Tensor:
        masks = self.masks()
        used = self.layers[0].in_features * masks[0].sum()
        total = float(self.layers[0].in_features * self.layers[0].out_features)
        for prev, cur, layer in zip(masks, masks[1:], self.layers[1:], strict=False):
            used = used + prev.sum() * cur.sum()
            total += layer.in_features * layer.out_features
        return used / total

    def prune(self) -> int:
        """Zero the pruned units' rows; returns the parameters left in the gated layers."""
        kept_in, left = self.layers[0].in_features, 0
        with torch.no_grad():
            for layer, e in zip(self.layers, self.e, strict=True):
                keep = e.detach() > 0
                layer.weight[~keep] = 0
                layer.bias[~keep] = 0
                k = int(keep.sum())
                left += kept_in * k + k
                kept_in = k
        return left


class Branches:
    """Frozen earlier branches (as state dicts, rebuilt lazily) + the live one, and the classifier over their
    concatenated features."""

    def __init__(self) -> None:
        self.split: Split | None = None
        self.states: list[dict[str, torch.Tensor]] = []
        self._modules: list[nn.Module] = []
        self.fc: nn.Linear | None = None
        self.gates: UnitGates | None = None  # the live branch's pruning gates (DER with pruning)
        self.sizes: list[int] = []  # parameters of each frozen branch after pruning (empty: not pruned)

    def setup(self, model: nn.Module, shared: bool, n_classes: int, device: torch.device) -> None:
        if self.split is None:
            self.split = Split(model, shared)
        if self.fc is None:
            self.fc = nn.Linear(self.split.dim, n_classes).to(device)
        self.fc.to(device)

    @property
    def count(self) -> int:
        """Branches in use: the frozen ones plus the live one."""
        return len(self.states) + 1

    def frozen(self, device: torch.device) -> list[nn.Module]:
        while len(self._modules) < len(self.states):
            self._modules.append(self.split.frozen_copy(self.states[len(self._modules)]).to(device))
        return self._modules

    def grow(self, device: torch.device) -> None:
        """Freeze a copy of the live branch (which goes on training from its weights, as the authors' code
        initialises each new extractor from the previous one) and widen the classifier: the old weights keep
        their columns, the new branch's columns start from a fresh initialisation."""
        self.states.append({k: v.detach().clone() for k, v in self.split.branch.state_dict().items()})
        old = self.fc
        fc = nn.Linear(self.split.dim * self.count, old.out_features).to(device)
        with torch.no_grad():
            fc.weight[:, : old.in_features] = old.weight
            fc.bias.copy_(old.bias)
        self.fc = fc

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(concatenated features of every branch, the live branch's own features) of ``x``."""
        h = self.split.trunk(x)
        live = self.split.branch(h) if self.gates is None else self.gates.forward(self.split.branch, h)
        if not self.states:
            return live, live
        with torch.no_grad():
            old = [m(h) for m in self.frozen(x.device)]
        return torch.cat([*old, live], dim=1), live

    def n_params(self) -> int:
        """Parameters used at inference: trunk, every branch, classifier."""
        branches = sum(self.sizes) + (self.count - len(self.sizes)) * self.split.branch_params()
        return self.split.trunk_params() + branches + sum(p.numel() for p in self.fc.parameters())

    def state_dict(self) -> dict:
        return {"states": self.states, "fc": None if self.fc is None else self.fc.state_dict(), "sizes": self.sizes}

    def load_state_dict(self, state: dict) -> None:
        self.states = list(state["states"])
        self.sizes = [int(n) for n in state["sizes"]]
        self._modules = []
        if state["fc"] is not None:
            w = state["fc"]["weight"]
            self.fc = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
            self.fc.load_state_dict(state["fc"])


def stream_concat_features(learner, branches: Branches, keys: torch.Tensor) -> torch.Tensor:
    """Concatenated features of the stream samples ``keys`` in eval mode (the model's mode is restored)."""
    model = learner.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = [branches.features(x)[0] for _, x in learner.batches(keys)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=learner.device)


def balanced_finetune(learner, fc: nn.Linear, feats: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                      allowed: torch.Tensor, epochs: int, lr: float) -> None:
    """Retrain ``fc`` on fixed features of a class-balanced set (the exemplar memory), as DER's classifier
    learning stage: CE over the ``allowed`` classes (those seen so far), the loop's task masks on multi-head
    streams, SGD at ``lr``, ``train.batch_size`` batches in the learner's seeded order."""
    opt = torch.optim.SGD(fc.parameters(), lr=lr)
    bs = learner.config.batch_size
    n = int(y.shape[0])
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=learner.generator).to(feats.device)
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                logits = fc(feats[idx]).masked_fill(~allowed, MASKED_LOGIT)
                if learner.multi_head:
                    logits = logits.masked_fill(~learner.task_mask[t[idx]], MASKED_LOGIT)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(logits, y[idx]).backward()
                opt.step()
    for p in fc.parameters():
        p.grad = None
