"""EASE: Expandable Subspace Ensemble for pre-trained model-based class-incremental learning.

Zhou, Sun, Ye and Zhan, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning",
CVPR 2024 (arXiv 2403.12030). The method:

1. **One subspace per task.** The pre-trained backbone stays frozen. Each experience b gets a new lightweight
   adapter A_b, trained on that experience alone (cross-entropy of a cosine classifier over the experience's
   classes, dropped afterwards) and then frozen. A sample's representation is the concatenation of its
   features in every subspace so far, ``[phi_1(x), ..., phi_b(x)]``.
2. **Prototype classifier.** Class c's prototype in subspace j, P[c, j], is the mean of its training samples'
   features in that subspace, computed when c is learned for every subspace that exists then.
3. **Semantic-guided prototype complement.** Exemplar-free, an old class c (learned in task i) has no data when
   a later subspace j > i appears. Its prototype there is synthesised from classes that do have one: the
   classes learned in tasks >= j, whose prototypes exist in both subspace i and subspace j. With
   ``w = softmax_n(cos(P[c, i], P[n, i]))`` (similarity measured in the old subspace i),
   ``P[c, j] = sum_n w_n P[n, j]``. Recomputed after every experience as more classes arrive (the authors'
   ``recalc_sim``).
4. **Subspace reweighting.** The logit of class c (learned in task i) after b + 1 experiences is
   ``cos(phi_i(x), P[c, i]) + (alpha / b) * sum_{j != i} cos(phi_j(x), P[c, j])``: each class is judged
   mainly in its own subspace, the others contribute with weight ``alpha`` in total (paper: 0.1).

Defaults follow the paper and the authors' configuration (PILOT ``exps/ease.json``): adapter bottleneck 64,
adapter output scale 0.1, ``alpha`` 0.1, and for training (set in ``train.*``) SGD with momentum 0.9 at lr
0.025, weight decay 5e-4, cosine schedule, batch 48, 20 epochs. Deviation: the paper inserts an AdaptFormer
adapter into every ViT block; here each subspace is one residual bottleneck adapter on the backbone's pooled
features (the ``aper`` adapter), so a frozen backbone's features stay cached and a subspace costs no backbone
pass: it runs on ``efficientnet_lite0``, ``vit`` and any model with ``features(x)`` and a linear head. The
pre-trained features themselves are not a subspace (the paper's default, ``use_init_ptm: false``).

Memory: every adapter (``memory_bytes`` and ``cost.ease_adapter_params``) and the K x T prototypes; no
sample is stored. Task-IL comes from the evaluator's masking of the same logits.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.models.cache import SampleFeatureCache, sample_keys
from cltoolbox.params import Interval, NonNegative, Positive
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.aper import CosineHead, FeatureAdapter
from cltoolbox.strategies.extractor import class_mask, freeze, require_features_and_head, train_on


def complement(protos: torch.Tensor, real: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Fill every missing prototype by the semantic-guided complement.

    ``protos`` (K, T, d): prototypes per class and subspace; ``real`` (K, T) bool: which were computed from
    data; ``own`` (K,) long: each class's own subspace (-1 if unseen). For a seen class c and a subspace
    j > own[c] where ``real[c, j]`` is False, the candidates are the classes n != c with a real prototype in
    both own[c] and j; ``P[c, j] = sum_n softmax_n(cos(P[c, own], P[n, own])) P[n, j]``. Returns a new tensor.
    """
    out = protos.clone()
    for c in torch.nonzero(own >= 0).flatten().tolist():
        i = int(own[c])
        for j in range(i + 1, protos.shape[1]):
            if real[c, j]:
                continue
            cand = real[:, i] & real[:, j]
            cand[c] = False
            if not cand.any():
                continue
            sim = F.normalize(protos[c, i], dim=0) @ F.normalize(protos[cand, i], dim=1).T
            out[c, j] = torch.softmax(sim, dim=0) @ protos[cand, j]
    return out


def reweighted_logits(feats: list[torch.Tensor], protos: torch.Tensor, own: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """EASE's logits (N, K) from the features ``feats[j]`` (N, d) of every subspace j and the prototypes
    (K, T, d): cosine in the class's own subspace plus ``alpha / (T - 1)`` times the cosines in the others."""
    t = len(feats)
    cos = torch.stack([F.normalize(f, dim=1) @ F.normalize(protos[:, j], dim=1).T for j, f in enumerate(feats)],
                      dim=2)  # N, K, T
    weight = torch.full((protos.shape[0], t), alpha / max(t - 1, 1), dtype=cos.dtype, device=cos.device)
    seen = own >= 0
    weight[seen, own[seen]] = 1.0
    return (cos * weight).sum(2)


class EASEPlugin(Plugin):
    method = "ease"

    def __init__(self, bottleneck: int, adapter_scale: float, alpha: float, scale: float) -> None:
        self.bottleneck, self.adapter_scale, self.alpha, self.scale = bottleneck, adapter_scale, alpha, scale
        self.adapters = nn.ModuleList()
        self.n_classes = 0
        self.dim = 0
        self.protos: torch.Tensor | None = None  # K, T, d float64 (T grows by one per experience)
        self.real: torch.Tensor | None = None  # K, T bool: computed from data (else complemented)
        self.own: torch.Tensor | None = None  # K long: the subspace a class was learned in, -1 if unseen
        self._head: CosineHead | None = None  # the current experience's training head, dropped afterwards
        self._current: torch.Tensor | None = None  # bool mask of the classes being trained
        self._cache = SampleFeatureCache()
        self._pending: list[dict] = []  # adapters' states from a checkpoint, loaded once the sizes are known
        self.shifts: list[float] = []  # per subspace: mean ||phi_b(x) - f(x)|| / ||f(x)|| on its experience

    def check(self, model, stream) -> None:
        require_features_and_head(model, "ease")

    def before_fit(self, learner, stream) -> None:
        self.check(learner.model, stream)
        self.n_classes = stream.n_classes
        self.dim = learner.model.head.in_features
        if self._pending:  # resumed: rebuild the frozen adapters of the checkpoint
            for b, state in enumerate(self._pending):
                adapter = self._new_adapter(learner, b)
                adapter.load_state_dict(state)
                self._freeze_adapter(adapter)
            self._pending = []

    def _new_adapter(self, learner, b: int) -> FeatureAdapter:
        # seeded by (run seed, experience), not the learner's generator, so a resumed run builds the same ones
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(learner.seed * 100_003 + b)
            adapter = FeatureAdapter(self.dim, self.bottleneck, self.adapter_scale)
            self._head = CosineHead(self.dim, self.n_classes)
        adapter.to(learner.device)
        self._head.to(learner.device)
        self.adapters.append(adapter)
        return adapter

    @staticmethod
    def _freeze_adapter(adapter: nn.Module) -> None:
        adapter.requires_grad_(False)
        adapter.eval()

    # -- training one subspace ---------------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        if self._current is None:
            return []
        return [*self.adapters[-1].parameters(), *self._head.parameters()]

    def forward(self, learner, x, t):
        if self._current is None:
            return None
        logits = self._head(self.adapters[-1](learner.model.features(x)))
        return logits.masked_fill(~self._current, MASKED_LOGIT)  # the experience's own classes compete

    def train_experience(self, learner, exp) -> bool:
        freeze(learner.model)  # the backbone never trains (a frozen one is cached); idempotent after a resume
        self._new_adapter(learner, len(self.adapters))
        self._current = class_mask(self.n_classes, exp.classes, learner.device)
        try:
            train_on(learner, exp)
        finally:
            self._current = None
            self._head = None
        self._freeze_adapter(self.adapters[-1])
        self._update_prototypes(learner, exp)
        return True

    # -- prototypes ---------------------------------------------------------------------------------------
    def _backbone_features(self, learner, x: torch.Tensor) -> torch.Tensor:
        model = learner.model
        if getattr(model, "frozen", False):  # the model caches its frozen features itself
            return model.features(x).flatten(1)
        return self._cache(x, lambda rows: model.features(rows).flatten(1))

    def subspace_features(self, learner, x: torch.Tensor) -> list[torch.Tensor]:
        """``[phi_1(x), ..., phi_T(x)]``: the features of ``x`` in every subspace (float64, no gradients)."""
        with torch.no_grad():
            f = self._backbone_features(learner, x)
            return [adapter(f).double() for adapter in self.adapters]

    def _shift(self, learner, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far the newest adapter moved the backbone features: ||phi_T(x) - f|| / ||f||."""
        with torch.no_grad():
            f = self._backbone_features(learner, x).double()
            return (self.adapters[-1](f.float()).double() - f).norm(dim=1) / f.norm(dim=1).clamp_min(1e-12)

    def _update_prototypes(self, learner, exp) -> None:
        t, dev = len(self.adapters), learner.device
        sums = torch.zeros(self.n_classes, t, self.dim, dtype=torch.float64, device=dev)
        counts = torch.zeros(self.n_classes, dtype=torch.float64, device=dev)
        was_training = learner.model.training
        learner.model.eval()
        labels, start, shift = exp.y_train.to(dev), 0, 0.0
        for keys, x in learner.batches(learner.stream.keys(exp.train)):  # in order: labels follow y_train
            with sample_keys(keys, learner.stream):
                feats = torch.stack(self.subspace_features(learner, x), dim=1)  # N, T, d
                shift += float(self._shift(learner, x).sum())
            y, start = labels[start : start + feats.shape[0]], start + feats.shape[0]
            sums.index_add_(0, y, feats)
            counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        learner.model.train(was_training)
        self.shifts.append(shift / max(start, 1))
        new = counts > 0
        protos = torch.zeros(self.n_classes, t, self.dim, dtype=torch.float64, device=dev)
        real = torch.zeros(self.n_classes, t, dtype=torch.bool, device=dev)
        own = torch.full((self.n_classes,), -1, dtype=torch.int64, device=dev)
        if self.protos is not None:  # the earlier subspaces' prototypes and flags carry over
            protos[:, : t - 1], real[:, : t - 1], own = self.protos, self.real, self.own.clone()
        protos[new] = sums[new] / counts[new].view(-1, 1, 1)
        real[new] = True
        own[new] = t - 1
        real[~new & (own >= 0), t - 1] = False
        self.real, self.own = real, own
        self.protos = complement(protos, real, own)

    # -- prediction -----------------------------------------------------------------------------------------
    def predict(self, learner, x, task_ids):
        if self.protos is None:
            return None  # nothing learned yet: the model's own logits
        logits = reweighted_logits(self.subspace_features(learner, x), self.protos, self.own, self.alpha)
        return (self.scale * logits).masked_fill(self.own < 0, MASKED_LOGIT).to(torch.float32)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.protos is None:
            return {}
        return {"adapters": [a.state_dict() for a in self.adapters], "protos": self.protos, "real": self.real,
                "own": self.own, "shifts": list(self.shifts)}

    def load_state_dict(self, state: dict) -> None:
        if "protos" not in state:
            return
        self.protos, self.real, self.own = state["protos"], state["real"], state["own"]
        self.shifts = [float(v) for v in state["shifts"]]
        self.adapters = nn.ModuleList()
        self._pending = [dict(s) for s in state["adapters"]]  # built in before_fit, which knows the sizes
        self._cache.clear()

    def report(self, learner, stream) -> dict[str, list[float]]:
        """``ease_feature_shift``: per subspace, the mean relative change its adapter makes to the backbone
        features on its own experience's training data (~0: the adapter did not train, EASE ~ SimpleCIL)."""
        return {"ease_feature_shift": list(self.shifts)}

    def adapter_params(self) -> int:
        return sum(p.numel() for a in self.adapters for p in a.parameters())

    def cost(self) -> dict[str, float]:
        return {"ease_adapter_params": float(self.adapter_params()), "ease_subspaces": float(len(self.adapters))}

    def memory_usage(self) -> tuple[int, int]:
        """Seen classes; bytes of every adapter and of the prototypes (all subspaces)."""
        if self.protos is None:
            return 0, 0
        adapters = tensor_bytes(*(p for a in self.adapters for p in a.parameters()))
        return int((self.own >= 0).sum()), adapters + tensor_bytes(self.protos, self.real, self.own)


@register_strategy("ease", test_params={"bottleneck": 8})
def ease(bottleneck: Annotated[int, Interval(1, 65536)] = 64, adapter_scale: Positive = 0.1, alpha: NonNegative = 0.1,
         scale: Positive = 1.0) -> list[Plugin]:
    """EASE (Zhou et al., CVPR 2024): an adapter per experience, concatenated subspaces, complemented prototypes.

    ``bottleneck`` and ``adapter_scale``: each experience's residual adapter on the backbone features (paper and
    PILOT: 64 and 0.1), trained with ``train.*`` against a cosine head over the experience's classes.
    ``alpha``: total weight of the other subspaces in a class's logit (paper 0.1). ``scale`` multiplies the
    logits (changes no prediction).
    """
    return [EASEPlugin(bottleneck, adapter_scale, alpha, scale)]
