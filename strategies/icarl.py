"""iCaRL: incremental Classifier and Representation Learning.

Rebuffi, Kolesnikov, Sperl and Lampert 2017, "iCaRL: Incremental Classifier and Representation Learning"
(CVPR). Three parts:

* Representation learning (paper Alg. 3): each experience trains on its data plus the exemplars with a
  sigmoid binary cross-entropy per output; the targets are one-hot for the classes of the current
  experience and, for the classes of earlier experiences, the sigmoid outputs of the network frozen at
  the end of the previous experience (distillation). The network has one output per class of the stream,
  as in the authors' fixed-size network, so classes not seen yet get target 0.
* Exemplar management (Alg. 4, 5): a fixed budget of ``memory_size`` exemplars, m = memory_size // (classes
  seen) per class. New classes pick theirs by herding in L2-normalised feature space (``model.features``):
  greedily, the sample whose addition brings the exemplar mean closest to the class mean. Old classes are
  reduced by truncating their herding order.
* Classification (Alg. 1): nearest mean of exemplars (NME) in normalised feature space; ``classifier:
  logits`` uses the network's outputs instead, for comparison.

Defaults: ``memory_size = 500`` (the toolbox's replay budget for Split-MNIST; the paper used K = 2000 on
iCIFAR-100 / ImageNet), ``classifier = "nme"`` (the paper's classifier). Training hyperparameters come from
``train.*``; the paper's CIFAR run (lr 2.0, 70 epochs, batch 128) does not apply to MLPs on MNIST.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F

from cltoolbox.errors import ConfigError
from cltoolbox.params import PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import extract_features, stream_features


def normalised_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised ``model.features`` of ``x`` in eval mode (restores the previous mode)."""
    return F.normalize(extract_features(model, x, batch_size), dim=1)


def normalised_stream_features(learner, keys: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``model.features`` of the stream samples ``keys``, fetched ``eval_batch_size`` at a time."""
    return F.normalize(stream_features(learner, keys), dim=1)


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``features`` (normalised, one class) in iCaRL's herding order.

    Step k picks the unused row x minimising ||mu - (sum of the k-1 chosen + x) / k||, mu the class mean:
    one vectorised distance computation per exemplar, no loop over samples.
    """
    n = features.shape[0]
    m = min(m, n)
    mu = features.mean(0)
    chosen = torch.empty(m, dtype=torch.long, device=features.device)
    running = torch.zeros_like(mu)
    used = torch.zeros(n, dtype=torch.bool, device=features.device)
    for k in range(m):
        dist = (mu - (running + features) / (k + 1)).norm(dim=1).masked_fill(used, float("inf"))
        i = dist.argmin()
        chosen[k] = i
        used[i] = True
        running += features[i]
    return chosen


class ICaRLPlugin(Plugin):
    supports_ddp = True  # per-row criterion on the shard; herding over the whole experience
    def __init__(self, memory_size: int, classifier: str) -> None:
        self.memory_size = memory_size
        self.classifier = classifier
        # exemplars (stream keys), grouped by class in order of arrival, each class in herding order (rank 0 first)
        self.key: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.rank: torch.Tensor | None = None
        self.seen: list[int] = []  # classes with exemplars, in order of arrival
        self.means: torch.Tensor | None = None  # (n_classes, d) normalised exemplar means; rows of unseen unused
        self.old_state: dict[str, torch.Tensor] | None = None  # weights frozen at the end of the last experience
        self._old_model: torch.nn.Module | None = None
        self._old_classes: torch.Tensor | None = None
        self.item_bytes = 0  # native size of one exemplar (Stream.sample_bytes), for memory_usage

    def before_fit(self, learner, stream) -> None:
        self.item_bytes = stream.sample_bytes()
        if not callable(getattr(learner.model, "features", None)):
            raise ConfigError("strategy: icarl needs a model with a features(x) method (herding and NME use it); "
                              "use model mlp or resnet18_reduced")
        if self.memory_size < stream.n_classes:
            raise ConfigError(f"strategy.memory_size: {self.memory_size} is below the stream's {stream.n_classes} "
                              "classes; iCaRL keeps at least one exemplar per class")

    # -- training --------------------------------------------------------------------------------------
    def before_experience(self, learner, exp) -> None:
        current = set(exp.y_train.unique().tolist())
        old = [c for c in self.seen if c not in current]  # distilled; classes of this experience are learned
        self._old_classes = torch.tensor(old, dtype=torch.long, device=learner.device) if old else None
        if self.old_state is not None and old and self._old_model is None:
            model = copy.deepcopy(learner.model)
            model.load_state_dict(self.old_state)
            self._old_model = model.eval().requires_grad_(False)

    def train_experience(self, learner, exp) -> bool:
        key, y = learner.stream.keys(exp.train), exp.y_train
        t = torch.full_like(y, exp.task_id)
        if self.key is not None:
            key, y, t = torch.cat((key, self.key)), torch.cat((y, self.y)), torch.cat((t, self.t))
        learner.train_data(key, y, t)
        return True

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(batch.y, logits.shape[1]).to(logits.dtype)
        if self._old_model is not None and self._old_classes is not None:
            with torch.no_grad():
                old = self._old_model(learner.model_input(batch.x))  # the image the new logits saw
                if learner.multi_head:
                    old = old.masked_fill(~learner.task_mask[batch.t], MASKED_LOGIT)
            cols = self._old_classes
            target[:, cols] = torch.sigmoid(old[:, cols]).to(logits.dtype)
        # summed over outputs as in the paper's Alg. 3 (so its scale matches CE at the same lr), mean over the batch
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]

    # -- exemplars ------------------------------------------------------------------------------------
    def after_experience(self, learner, exp) -> None:
        model = learner.model
        new = exp.y_train.unique().tolist()
        for c in new:
            if c not in self.seen:
                self.seen.append(c)
        m = self.memory_size // len(self.seen)
        # candidates of this experience's classes: its data plus their earlier exemplars (domain shifts)
        key, y, t = learner.stream.keys(exp.train), exp.y_train, torch.full_like(exp.y_train, exp.task_id)
        keep_key, keep_y, keep_t, keep_r = [], [], [], []
        if self.key is not None:
            is_new = torch.isin(self.y, torch.tensor(new, device=self.y.device))
            old = ~is_new & (self.rank < m)  # reduction: truncate the herding order
            keep_key.append(self.key[old])
            keep_y.append(self.y[old])
            keep_t.append(self.t[old])
            keep_r.append(self.rank[old])
            key = torch.cat((key, self.key[is_new]))
            y, t = torch.cat((y, self.y[is_new])), torch.cat((t, self.t[is_new]))
        for c in new:
            idx = torch.nonzero(y == c).flatten()
            order = idx[herding(normalised_stream_features(learner, key[idx]), m)]
            keep_key.append(key[order])
            keep_y.append(y[order])
            keep_t.append(t[order])
            keep_r.append(torch.arange(len(order), device=order.device))
        self.key, self.y, self.t, self.rank = (torch.cat(v) for v in (keep_key, keep_y, keep_t, keep_r))
        # group by class in order of arrival, herding rank within (stable layout for any later reduction)
        pos = torch.empty(max(self.seen) + 1, dtype=torch.long, device=self.y.device)
        pos[torch.tensor(self.seen, device=self.y.device)] = torch.arange(len(self.seen), device=self.y.device)
        order = torch.argsort(pos[self.y] * (self.memory_size + 1) + self.rank)
        self.key, self.y, self.t, self.rank = self.key[order], self.y[order], self.t[order], self.rank[order]
        self._update_means(learner)
        self.old_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._old_model = None  # rebuilt from old_state when the next experience needs it

    def _update_means(self, learner) -> None:
        feats = normalised_stream_features(learner, self.key)
        C = learner.stream.n_classes
        sums = torch.zeros(C, feats.shape[1], device=feats.device).index_add_(0, self.y, feats)
        self.means = F.normalize(sums, dim=1)  # mean direction; the count does not change it

    # -- inference ------------------------------------------------------------------------------------
    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor | None:
        if self.classifier == "logits" or self.means is None:
            return None
        feats = normalised_features(learner.model, x, x.shape[0])
        seen = torch.tensor(self.seen, device=feats.device)
        out = torch.full((x.shape[0], self.means.shape[0]), MASKED_LOGIT, device=feats.device, dtype=feats.dtype)
        out[:, seen] = -torch.cdist(feats, self.means[seen])
        return out

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"key": self.key, "y": self.y, "t": self.t, "rank": self.rank, "seen": list(self.seen),
                "means": self.means, "old_state": self.old_state}

    def load_state_dict(self, state: dict) -> None:
        self.key, self.y, self.t, self.rank = state["key"], state["y"], state["t"], state["rank"]
        self.seen = [int(c) for c in state["seen"]]
        self.means, self.old_state = state["means"], state["old_state"]
        self._old_model = None

    def memory_usage(self) -> tuple[int, int]:
        n = 0 if self.y is None else int(self.y.shape[0])
        old = tensor_bytes(*self.old_state.values()) if self.old_state else 0
        # exemplars counted at their native size, as if stored (they are kept as stream keys)
        return n, n * self.item_bytes + tensor_bytes(self.y, self.t, self.rank, self.means) + old


@register_strategy("icarl", test_params={"memory_size": 50})
def icarl(memory_size: PositiveInt = 500, classifier: Literal["nme", "logits"] = "nme") -> list[Plugin]:
    """iCaRL (Rebuffi et al. 2017): herding exemplars, sigmoid BCE with distillation, nearest-mean classifier.

    ``classifier: logits`` classifies with the network's outputs instead of the nearest exemplar mean.
    """
    return [ICaRLPlugin(memory_size, classifier)]
