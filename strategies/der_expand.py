"""DER: Dynamically Expandable Representation.

Yan, Xie and He 2021, "DER: Dynamically Expandable Representation for Class Incremental Learning" (CVPR). An
exemplar method (the experience's data plus a class-balanced herding memory, see ``strategies/exemplar.py``)
that adds a feature extractor per incremental step:

* Expansion (Sec. 3.2): at step t a new extractor F_t is added; F_1..F_{t-1} are frozen (weights and
  normalisation statistics). The features are u = [F_1(x), ..., F_t(x)] and the classifier H_t over all
  classes seen so far reads u (the old classes' weights on the old features are inherited). Training loss: CE
  of H_t over the classes seen so far, plus the auxiliary loss (Eq. 3) lambda_a * CE of an auxiliary
  classifier H_a on F_t(x) alone over |new classes| + 1 outputs, every old class mapped to the one extra
  "old" output, which pushes F_t to learn features that tell the new classes apart (lambda_a = 1, the paper's).
  The new extractor starts from the previous one's weights, as in the authors' code.
* Classifier learning (Sec. 3.4): after the representation is learnt, the classifier is retrained on
  class-balanced data with the features fixed: here the exemplar memory once it holds the new classes too
  (equal slots per class), ``balanced_epochs`` epochs at ``balanced_lr`` (our defaults: 30 epochs at 0.05; the
  paper retrains on CIFAR-100 for 30 epochs).
* Pruning (Sec. 3.3, the paper's DER w/ P), optional (``prune: true``; off by default, as PyCIL): every hidden
  unit of the new extractor gets a gate sigmoid(s e) annealed within each epoch from s = 1/s_max to s_max
  (HAT's masks, which the paper follows; s_max = 400, HAT's value), and the sparsity loss (the fraction of the
  extractor's weights still in use, weight ``sparsity_weight``) closes gates; after the step, units with a
  closed gate are removed (see ``expansion.UnitGates``) and only the kept weights are counted in ``cost``.
  Implemented for ``mlp`` extractors (unit masks, with HAT's gradient compensation); on ``resnet18_reduced``
  (channel masks) it is refused.

The growing parameter count is in metrics.json's ``cost``: ``expansion_params`` (trunk + every extractor +
classifier, what inference runs) and ``params_exp_<i>`` after each experience. On ``mlp`` each extractor is
the whole body; on ``resnet18_reduced`` the whole network up to the pooled features (see ``expansion.py``).

Where this differs: the unified classifier's softmax runs over the classes seen so far (the paper's grows with
them); class-IL and task-IL (the loop's task masks) both work. The memory is the toolbox's budget (500 on
Split-MNIST; the paper uses 2,000 on CIFAR-100).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.params import Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.exemplar import ExemplarPlugin
from cltoolbox.strategies.expansion import Branches, Split, UnitGates, balanced_finetune, stream_concat_features


class DERExpandPlugin(ExemplarPlugin):
    """DER's expansion (and, with ``shared=True``, MEMO's): see the module docstring."""

    name = "der_expand"
    shared = False  # MEMO shares the trunk

    def __init__(self, memory_size: int, aux_weight: float, balanced_epochs: int, balanced_lr: float,
                 selection: str = "herding", prune: bool = False, sparsity_weight: float = 1.0,
                 s_max: float = 400.0) -> None:
        super().__init__(memory_size, selection)
        self.aux_weight, self.balanced_epochs, self.balanced_lr = aux_weight, balanced_epochs, balanced_lr
        self.prune, self.sparsity_weight, self.s_max = prune, sparsity_weight, s_max
        self._batch, self._n_batches = 0, 1  # position in the epoch, for the gates' annealing
        self.branches = Branches()
        self.aux: nn.Linear | None = None
        self.params_per_exp: list[int] = []
        self._live: torch.Tensor | None = None  # the live branch's features of this step's batch
        self._seen_mask: torch.Tensor | None = None

    def check(self, model: nn.Module, stream) -> None:
        super().check(model, stream)
        from cltoolbox.models.mlp import MLP

        Split(model, self.shared)  # ConfigError on models that do not split
        if self.prune and not isinstance(model, MLP):
            raise ConfigError("strategy.prune: DER's pruning is implemented for mlp extractors (unit masks); use "
                              "model.name: mlp or prune: false")

    def parameters(self) -> list[torch.Tensor]:
        fc, gates = self.branches.fc, self.branches.gates
        out = [] if fc is None else list(fc.parameters())
        return out + ([] if self.aux is None else list(self.aux.parameters())) + ([] if gates is None else gates.e)

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        self.branches.setup(learner.model, self.shared, stream.n_classes, learner.device)
        if self.seen:  # resumed after the first experience
            self._after_first(learner)

    def _after_first(self, learner) -> None:
        """What happens to the shared trunk after the first experience (MEMO freezes it)."""

    def before_experience(self, learner, exp) -> None:
        super().before_experience(learner, exp)
        dev = learner.device
        self._seen_mask = self.seen_mask(learner.stream.n_classes, dev)
        self.aux = None
        if self.seen:  # an incremental step: a new extractor
            self._after_first(learner)
            self.branches.grow(dev)
            if self.old_classes is not None and self.aux_weight > 0:
                self.aux = nn.Linear(self.branches.split.dim, len(self.current_classes) + 1).to(dev)
        if self.prune:
            self.branches.gates = UnitGates(self.branches.split.branch, self.s_max, dev)

    def train_experience(self, learner, exp) -> bool:
        key, y, t = self.training_set(learner, exp)
        self._n_batches = -(-int(y.shape[0]) // learner.config.batch_size)
        learner.train_data(key, y, t)
        return True

    def before_epoch(self, learner, exp, epoch: int) -> None:
        self._batch = 0
        if self.branches.gates is not None:
            self.branches.gates.anneal(0, self._n_batches)

    def after_backward(self, learner, batch: Batch) -> None:
        if self.branches.gates is not None:
            self.branches.gates.compensate()

    def after_step(self, learner, batch: Batch) -> None:
        self._batch += 1
        if self.branches.gates is not None:
            self.branches.gates.clamp()
            self.branches.gates.anneal(self._batch, self._n_batches)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        feats, self._live = self.branches.features(x)
        return self.branches.fc(feats)

    def forward(self, learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.branches.fc(self.branches.features(x)[0])
        return logits if self._seen_mask is None else logits.masked_fill(~self._seen_mask, MASKED_LOGIT)

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.masked_fill(~self._seen_mask, MASKED_LOGIT), batch.y)
        if self.aux is not None and self._live is not None:
            loss = loss + self.aux_weight * F.cross_entropy(self.aux(self._live), self.aux_targets(batch.y))
        if self.branches.gates is not None:
            loss = loss + self.sparsity_weight * self.branches.gates.sparsity()
        self._live = None
        return loss

    def aux_targets(self, y: torch.Tensor) -> torch.Tensor:
        """0 for every old class, 1 + the class's rank among this experience's classes otherwise."""
        lookup = torch.zeros(self._seen_mask.shape[0], dtype=torch.long, device=y.device)
        lookup[self.current_classes] = torch.arange(1, len(self.current_classes) + 1, device=y.device)
        return lookup[y]

    def herding_features(self, learner, keys: torch.Tensor) -> torch.Tensor:
        return F.normalize(stream_concat_features(learner, self.branches, keys), dim=1)

    def after_experience(self, learner, exp) -> None:
        self.aux = None
        gates = self.branches.gates
        if gates is not None:  # remove the closed units before the extractor is used for herding and frozen
            sizes = self.branches.sizes
            sizes += [self.branches.split.branch_params()] * (len(self.branches.states) - len(sizes))
            sizes.append(gates.prune())
            self.branches.gates = None
        super().after_experience(learner, exp)  # exemplars chosen in the concatenated feature space
        self.old_state = None  # no teacher: old extractors are frozen, not distilled
        if self.old_classes is not None and self.balanced_epochs > 0:
            self._balanced_finetune(learner)
        self.params_per_exp.append(self.branches.n_params())

    def _balanced_finetune(self, learner) -> None:
        m = self.memory
        keys = m.key[: m.size]
        feats = stream_concat_features(learner, self.branches, keys)
        balanced_finetune(learner, self.branches.fc, feats, m.y[: m.size].to(feats.device),
                          m.t[: m.size].to(feats.device), self._seen_mask, self.balanced_epochs, self.balanced_lr)

    def cost(self) -> dict[str, float]:
        out = {"expansion_params": float(self.branches.n_params()) if self.branches.split is not None else 0.0}
        out.update({f"params_exp_{i}": float(n) for i, n in enumerate(self.params_per_exp)})
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "branches": self.branches.state_dict(),
                "params_per_exp": list(self.params_per_exp),
                "seen_mask": self._seen_mask}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.branches.load_state_dict(state["branches"])
        self.params_per_exp = [int(n) for n in state["params_per_exp"]]
        self._seen_mask = state["seen_mask"]


@register_strategy("der_expand", test_params={"memory_size": 60, "balanced_epochs": 2})
def der_expand(memory_size: PositiveInt = 500, aux_weight: NonNegative = 1.0,
               balanced_epochs: Annotated[int, Min(0)] = 30, balanced_lr: Positive = 0.05,
               selection: Literal["herding", "random"] = "herding", prune: bool = False,
               sparsity_weight: NonNegative = 1.0, s_max: Annotated[float, Min(1)] = 400.0) -> list[Plugin]:
    """DER (Yan et al. 2021): a new feature extractor per step, old ones frozen, classifier over the concatenated
    features, auxiliary new-vs-old classifier, class-balanced classifier finetuning; no pruning.

    ``memory_size`` (>= 1): class-balanced exemplars; ``aux_weight`` (>= 0): lambda_a of the auxiliary loss
    (paper: 1); ``balanced_epochs`` (>= 0, 0 = off) and ``balanced_lr`` (> 0): the classifier's class-balanced
    retraining on the exemplars; ``selection``: exemplars by herding (the paper's) or at random; ``prune``: the
    optional mask-based pruning (mlp), with ``sparsity_weight`` (>= 0) and the gates' annealing ``s_max`` (>= 1).
    """
    return [DERExpandPlugin(memory_size, aux_weight, balanced_epochs, balanced_lr, selection, prune,
                            sparsity_weight, s_max)]
