"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing.

Hou, Pan, Loy, Wang and Lin 2019, "Learning a Unified Classifier Incrementally via Rebalancing" (CVPR). An
exemplar method (the experience's data plus a class-balanced memory, see ``strategies/exemplar.py``) with
three parts against the imbalance between new and old classes:

* Cosine normalisation (their Sec. 3.2): logits are sigma * cos(theta_c, f(x)), the cosine between the
  feature and each class's weight vector times a learnable scale sigma (initialised to 1), so new classes
  cannot win by larger weight norms or biases. The weight vectors are the rows of the model's own ``head``
  (its bias is unused); sigma is the plugin's parameter.
* Less-forget constraint (Sec. 3.3, Eq. 6): lambda * (1 - cos(f*(x), f(x))) on every training sample, f* the
  features of the model frozen at the end of the previous experience, with the adaptive weight
  lambda = lambda_base * sqrt(|C_old| / |C_new|) (Eq. 7).
* Inter-class separation (Sec. 3.4, Eq. 8): for every exemplar (a sample of an old class) in the batch, a
  margin ranking loss max(0, m - cos(theta_y, f(x)) + cos(theta_k, f(x))) against each of the K new classes
  with the highest cosine (the hard negatives), averaged over the (sample, negative) pairs.

In each incremental step the new classes' weight vectors start as their normalised mean feature ("imprinted",
as in the authors' implementation; ``imprint: false`` keeps the head's values) and the old classes' weight
vectors stay fixed (``fix_old: true``: also the authors' implementation, which trains only the new classes'
part of the cosine layer); the CE runs over all outputs.

Defaults from the paper's CIFAR-100 setting: lambda_base = 5, K = 2, m = 0.5 (Sec. 4.1); exemplars by herding as
in the paper (``selection: random`` for a uniform sample per class). Deviations: the features are the
model's ``features(x)`` as they are (the paper removes the last ReLU of its ResNets so that features can be
negative; our MLP's features end with a ReLU, so cosines lie in [0, 1]). The paper's optional class-balanced
finetuning (CBF) is ``balanced_epochs`` (default 0, off): after an incremental step's exemplars are chosen, the
cosine classifier (every class's weight vector and sigma) is finetuned with the backbone frozen on the exemplar
memory, which holds the same number of samples of every class, at ``balanced_lr``. Task-IL streams train with
the loop's task mask; the margin loss
then does nothing (old and new classes never compete) and is skipped.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from cltoolbox.params import Interval, Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.exemplar import ExemplarPlugin


def margin_ranking(cos: torch.Tensor, y: torch.Tensor, old: torch.Tensor, new: torch.Tensor, k: int,
                   margin: float, n_old: int | None = None) -> torch.Tensor:
    """LUCIR's Eq. 8: mean over the rows of old classes and their top-``k`` new classes of
    max(0, margin - cos[gt] + cos[negative]); 0 when the batch holds no old-class sample. ``n_old``: the number of
    old-class rows the mean is over (default: those in ``y``; under DDP, those of the global batch)."""
    rows = torch.isin(y, old)
    n_old = int(rows.sum()) if n_old is None else n_old  # the step's one host sync
    if n_old == 0:
        return cos.new_zeros(())
    c = cos[rows]
    gt = c.gather(1, y[rows].unsqueeze(1))
    hard = c.index_select(1, new).topk(min(k, len(new)), dim=1).values
    return F.relu(margin - gt + hard).sum() / (n_old * hard.shape[1])


class LUCIRPlugin(ExemplarPlugin):
    name = "lucir"
    # DDP: less-forget term per row on the shard; the margin term a mean over the global batch's exemplar rows;
    # sigma all-reduced by the loop; imprinting, herding and the balanced finetuning from full passes, alike
    supports_ddp = True

    def __init__(self, memory_size: int, lambda_base: float, margin: float, k: int, imprint: bool,
                 fix_old: bool, selection: str = "herding", balanced_epochs: int = 0,
                 balanced_lr: float = 0.01) -> None:
        super().__init__(memory_size, selection)
        self.balanced_epochs, self.balanced_lr = balanced_epochs, balanced_lr
        self.lambda_base, self.margin, self.k, self.imprint, self.fix_old = lambda_base, margin, k, imprint, fix_old
        self.sigma = torch.ones((), requires_grad=True)
        self._stash: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (x, features, cosines)
        self._old_rows: torch.Tensor | None = None

    def parameters(self) -> list[torch.Tensor]:
        return [self.sigma]

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        # a leaf on the training device (the optimizers are made later, per experience)
        self.sigma = self.sigma.detach().to(learner.device).requires_grad_(True)

    def cosine(self, learner, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, cosines with every class's weight vector) of ``x``."""
        feats = learner.model.features(x).flatten(1)
        return feats, F.normalize(feats, dim=1) @ F.normalize(learner.model.head.weight, dim=1).T

    def forward(self, learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats, cos = self.cosine(learner, x)
        self._stash = (x, feats, cos)
        return self.sigma * cos

    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(learner, x)[1]

    # -- an incremental step ------------------------------------------------------------------------------
    def before_experience(self, learner, exp) -> None:
        super().before_experience(learner, exp)
        head = learner.model.head
        new = [c for c in self.current_classes.tolist() if c not in set(self.seen)]
        if self.imprint and self.old_classes is not None and new:
            self._imprint(learner, exp, new)
        self._old_rows = head.weight.detach()[self.old_classes].clone() if self.fix_old and \
            self.old_classes is not None else None

    def _imprint(self, learner, exp, new: list[int]) -> None:
        """New classes' weight vectors := their normalised mean normalised feature, at the old rows' mean norm."""
        from cltoolbox.strategies.extractor import stream_features

        y = exp.y_train
        feats = F.normalize(stream_features(learner, learner.stream.keys(exp.train)), dim=1)
        w = learner.model.head.weight
        with torch.no_grad():
            scale = w[self.old_classes].norm(dim=1).mean()
            for c in new:
                mean = feats[(y == c).to(feats.device)].mean(0)
                w[c] = F.normalize(mean, dim=0) * scale

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        if self.old_classes is None:
            return 0.0
        x = learner.model_input(batch.x)
        stash = self._stash
        feats, cos = (stash[1], stash[2]) if stash is not None and stash[0] is x else self.cosine(learner, x)
        self._stash = None
        self.teacher(learner)
        with torch.no_grad():
            old_feats = self._teacher.features(x).flatten(1)
        lam = self.lambda_base * (len(self.old_classes) / len(self.current_classes)) ** 0.5
        out = lam * (1 - F.cosine_similarity(feats, old_feats, dim=1)).mean()
        if not learner.multi_head and self.margin > 0 and self.k > 0:
            # a mean over the global batch's exemplar rows; under DDP the loop weights this shard's loss by
            # rows x world / n, which n / rows undoes (cltoolbox.distributed)
            whole = learner.global_batch if learner.global_batch is not None else batch
            n_old = None if whole is batch else int(torch.isin(whole.y, self.old_classes.to(whole.y.device)).sum())
            out = out + margin_ranking(cos, batch.y, self.old_classes, self.current_classes, self.k, self.margin,
                                       n_old) * (len(whole) / max(len(batch), 1))
        return out

    def after_step(self, learner, batch: Batch) -> None:
        if self._old_rows is not None:  # the old classes' embeddings stay as they were (weight decay included)
            with torch.no_grad():
                learner.model.head.weight[self.old_classes] = self._old_rows

    def after_experience(self, learner, exp) -> None:
        self._old_rows = self._stash = None
        incremental = self.old_classes is not None
        super().after_experience(learner, exp)  # exemplars chosen, teacher frozen
        if incremental and self.balanced_epochs > 0:
            self._balanced_finetune(learner)
            self.old_state = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}

    def _balanced_finetune(self, learner) -> None:
        """CBF: the cosine classifier trained on the (class-balanced) exemplars' frozen features."""
        from cltoolbox.strategies.extractor import stream_features

        m = self.memory
        feats = F.normalize(stream_features(learner, m.key[: m.size]), dim=1)
        y = m.y[: m.size].to(feats.device)
        weight = learner.model.head.weight
        opt = torch.optim.SGD([weight, self.sigma], lr=self.balanced_lr)
        bs = learner.config.batch_size
        for _ in range(self.balanced_epochs):
            order = torch.randperm(m.size, generator=learner.generator).to(feats.device)
            for s in range(0, m.size, bs):
                idx = order[s : s + bs]
                logits = self.sigma * feats[idx] @ F.normalize(weight, dim=1).T
                if learner.multi_head:
                    logits = logits.masked_fill(~learner.task_mask[m.t[: m.size][idx]], MASKED_LOGIT)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(logits, y[idx]).backward()
                opt.step()
        weight.grad = self.sigma.grad = None

    def report(self, learner, stream) -> dict[str, float]:
        return {"lucir_sigma": float(self.sigma.detach())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sigma": self.sigma.detach()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sigma = state["sigma"].detach().clone().requires_grad_(True)


@register_strategy("lucir")
def lucir(memory_size: PositiveInt = 500, lambda_base: NonNegative = 5.0,
          margin: Annotated[float, Interval(0, 2, why="a gap between cosines")] = 0.5,
          k: Annotated[int, Min(0, why="hard negatives per exemplar; 0 = off")] = 2,
          imprint: bool = True, fix_old: bool = True,
          selection: Literal["herding", "random"] = "herding",
          balanced_epochs: Annotated[int, Min(0, why="0 = no class-balanced finetuning")] = 0,
          balanced_lr: Positive = 0.01) -> list[Plugin]:
    """LUCIR (Hou et al. 2019): cosine classifier, feature distillation (less-forget), margin ranking on exemplars.

    ``memory_size`` (>= 1): class-balanced exemplars; ``lambda_base`` (>= 0): less-forget weight (paper: 5 on
    CIFAR-100, 10 on ImageNet); ``margin`` in [0, 2] and ``k`` (>= 0, 0 = off): margin ranking loss (paper:
    0.5, 2); ``imprint``: new classes' weights start at their mean feature; ``fix_old``: old classes' weights stay
    fixed in later steps; ``selection``: exemplars by herding (the paper's) or at random; ``balanced_epochs``
    (>= 0, 0 = off) and ``balanced_lr`` (> 0): the optional class-balanced finetuning of the classifier.
    """
    return [LUCIRPlugin(memory_size, lambda_base, margin, k, imprint, fix_old, selection, balanced_epochs,
                        balanced_lr)]
