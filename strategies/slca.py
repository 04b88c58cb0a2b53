"""SLCA: Slow Learner with Classifier Alignment.

Zhang, Wang, Kang, Chen and Wei, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", ICCV 2023. The method:

1. **Slow learner.** Every task trains the whole model with cross-entropy, the representation layers at a
   learning rate much smaller than the classifier's (the paper: 0.01x, i.e. 1e-4 vs 1e-2): the pre-trained
   representation moves little, which the paper finds keeps most of what sequential fine-tuning forgets.
   Here: ``train.lr`` for the head and ``slow_factor * train.lr`` for everything else (one optimizer, two
   parameter groups through the ``param_groups`` hook, ``train.optimizer`` as configured). While a task
   trains, logits of the classes outside it are masked, so the classifier is trained on the task's own
   classes, the bias that step 2 removes.
2. **Classifier alignment.** After each task, the mean and covariance of each of its classes' features are
   stored; the classifier is then re-trained on features sampled from the Gaussians N(mu_c, Sigma_c) of
   all classes seen so far (``ca_samples`` per class, drawn afresh each of ``ca_epochs`` epochs; the paper:
   256 and 5), with logit normalisation (Wei et al. 2022: cross-entropy of z / (tau ||z||), the paper's
   tau = 0.1), SGD with momentum 0.9 at ``ca_lr``.

On a frozen backbone (``efficientnet_lite0``'s and ``vit``'s default ``frozen: true``) there is nothing for
the slow learner to train: only the head learns, and SLCA is step 2 on fixed pre-trained features. Build the
model with ``frozen: false`` for the paper's slow learner (the backbone then runs in training mode and its
features are not cached; class statistics are computed in eval mode after each task, as the paper does,
and those of earlier classes are not recomputed). Deviations: covariances are stored in float32 and
regularised with ``cov_ridge * trace(Sigma)/d`` on the diagonal before sampling (a class with fewer samples
than feature dimensions has a singular covariance); the classifier is one linear layer over all classes
(the paper's per-task classifier heads concatenated are the same thing).

Task-IL comes from the evaluator's masking of the same logits. Features are computed per stream key through
the backbone's cache, so file-backed streams work; no sample is stored, only the class statistics.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from cltoolbox.params import Interval, Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import class_mask, require_features_and_head, stream_features, train_on


class ClassGaussians:
    """Per-class feature mean (float64) and covariance (float32) of the classes seen so far."""

    def __init__(self) -> None:
        self.means: torch.Tensor | None = None  # K x d
        self.covs: torch.Tensor | None = None  # K x d x d
        self.seen: torch.Tensor | None = None  # K, bool

    def add(self, feats: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
        """Store (or replace) the statistics of each class present in ``y`` (unbiased covariance)."""
        f = feats.double()
        d = f.shape[1]
        if self.means is None:
            self.means = torch.zeros(n_classes, d, dtype=torch.float64, device=f.device)
            self.covs = torch.zeros(n_classes, d, d, dtype=torch.float32, device=f.device)
            self.seen = torch.zeros(n_classes, dtype=torch.bool, device=f.device)
        for c in y.unique().tolist():
            fc = f[y == c]
            mu = fc.mean(0)
            centred = fc - mu
            self.means[c] = mu
            self.covs[c] = (centred.T @ centred / max(fc.shape[0] - 1, 1)).float()
            self.seen[c] = True

    def factors(self, ridge: float) -> dict[int, torch.Tensor]:
        """Cholesky factor (float32) of ``Sigma_c + ridge * tr(Sigma_c)/d I`` for every seen class c."""
        out = {}
        d = self.means.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=self.means.device)
        for c in torch.nonzero(self.seen).flatten().tolist():
            cov = self.covs[c].double()
            cov = cov + (ridge * cov.diagonal().mean().clamp_min(1e-12)) * eye
            out[c] = torch.linalg.cholesky(cov).float()
        return out

    def sample(self, n: int, factors: dict[int, torch.Tensor],
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` features of every class in ``factors`` drawn from N(mu_c, L_c L_c^T), float32, with their
        labels (classes in order; the caller shuffles)."""
        xs, ys = [], []
        d = self.means.shape[1]
        for c, factor in factors.items():
            z = torch.randn(n, d, generator=generator).to(factor.device)
            xs.append(self.means[c].float() + z @ factor.T)
            ys.append(torch.full((n,), c, dtype=torch.int64, device=factor.device))
        return torch.cat(xs), torch.cat(ys)

    def state(self) -> dict:
        return {} if self.means is None else {"means": self.means, "covs": self.covs, "seen": self.seen}

    def load(self, state: dict) -> None:
        if "means" in state:
            self.means, self.covs, self.seen = state["means"], state["covs"], state["seen"]


def logit_norm_loss(logits: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy of ``logits / (tau * ||logits||)`` (LogitNorm, Wei et al. 2022)."""
    norms = logits.norm(dim=1, keepdim=True).clamp_min(1e-7)
    return F.cross_entropy(logits / (tau * norms), y)


class SLCAPlugin(Plugin):
    method = "slca"
    # DDP: the slow learner trains through the sharded loop (its forward's gradients all-reduced by the loop); the
    # class Gaussians come from full passes and the alignment from the shared generator, alike on every rank
    supports_ddp = True

    def __init__(self, slow_factor: float, ca_epochs: int, ca_samples: int, ca_lr: float, ca_batch_size: int,
                 logit_tau: float, cov_ridge: float) -> None:
        self.slow_factor, self.ca_epochs, self.ca_samples = slow_factor, ca_epochs, ca_samples
        self.ca_lr, self.ca_batch_size, self.logit_tau, self.cov_ridge = ca_lr, ca_batch_size, logit_tau, cov_ridge
        self.stats = ClassGaussians()
        self.n_classes = 0
        self._current: torch.Tensor | None = None  # bool mask of the classes of the task being trained

    def check(self, model, stream) -> None:
        require_features_and_head(model, "slca")

    def before_fit(self, learner, stream) -> None:
        self.check(learner.model, stream)
        self.n_classes = stream.n_classes

    # -- 1. the slow learner ------------------------------------------------------------------------------
    def param_groups(self, learner, params: list[torch.Tensor]) -> list[dict]:
        """The head at ``train.lr``, every other trainable tensor (backbone, plugins' own) at
        ``slow_factor * train.lr``; ``train.optimizer`` and its other settings as configured."""
        lr, head = learner.config.lr, {id(p) for p in learner.model.head.parameters()}
        return [{"params": [p for p in params if id(p) in head], "lr": lr},
                {"params": [p for p in params if id(p) not in head], "lr": lr * self.slow_factor}]

    def train_experience(self, learner, exp) -> bool:
        self._current = class_mask(self.n_classes, exp.classes, learner.device)
        try:
            train_on(learner, exp)
        finally:
            self._current = None
        return True

    def forward(self, learner, x, t):
        if self._current is None:
            return None
        return learner.model(x).masked_fill(~self._current, MASKED_LOGIT)

    # -- 2. classifier alignment ----------------------------------------------------------------------------
    def after_experience(self, learner, exp) -> None:
        # eval-mode features of the task's training data (a frozen backbone's come from its cache)
        feats = stream_features(learner, learner.stream.keys(exp.train))
        self.stats.add(feats, exp.y_train, self.n_classes)
        self.align(learner)

    def align(self, learner) -> None:
        """Re-train the head on features sampled from every seen class's Gaussian."""
        head = learner.model.head
        params = list(head.parameters())
        was = [p.requires_grad for p in params]
        head.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.ca_lr, momentum=0.9)
        seen = self.stats.seen
        column = torch.cumsum(seen.long(), 0) - 1  # class -> its column among the seen
        gen = learner.generator
        factors = self.stats.factors(self.cov_ridge) if self.ca_epochs else {}
        with torch.enable_grad():
            for _ in range(self.ca_epochs):
                x, y = self.stats.sample(self.ca_samples, factors, gen)
                order = torch.randperm(y.shape[0], generator=gen).to(y.device)
                for s in range(0, y.shape[0], self.ca_batch_size):
                    idx = order[s : s + self.ca_batch_size]
                    logits = head(x[idx])[:, seen]  # only the seen classes compete
                    loss = logit_norm_loss(logits, column[y[idx]], self.logit_tau)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for p, r in zip(params, was, strict=True):
            p.requires_grad_(r)

    # -- prediction and bookkeeping ---------------------------------------------------------------------------
    def predict(self, learner, x, task_ids):
        if self.stats.seen is None:
            return None
        return learner.model(x).masked_fill(~self.stats.seen, MASKED_LOGIT)

    def state_dict(self) -> dict:
        return self.stats.state()

    def load_state_dict(self, state) -> None:
        self.stats.load(state)

    def memory_usage(self) -> tuple[int, int]:
        """Seen classes; bytes of their means and covariances."""
        if self.stats.means is None:
            return 0, 0
        return int(self.stats.seen.sum()), tensor_bytes(self.stats.means, self.stats.covs, self.stats.seen)


@register_strategy("slca")
def slca(slow_factor: Annotated[float, Interval(0, 1)] = 0.01,
         ca_epochs: Annotated[int, Min(0, why="0 disables the alignment")] = 5, ca_samples: PositiveInt = 256,
         ca_lr: Positive = 0.01, ca_batch_size: PositiveInt = 128, logit_tau: Positive = 0.1,
         cov_ridge: NonNegative = 1e-4) -> list[Plugin]:
    """SLCA (Zhang et al., ICCV 2023): slow backbone lr + classifier aligned on per-class Gaussian features.

    ``slow_factor``: backbone lr = slow_factor * train.lr (paper 0.01; nothing trains in a frozen backbone).
    Classifier alignment after each experience: ``ca_epochs`` epochs over ``ca_samples`` sampled features per
    seen class (paper 5 and 256), SGD momentum 0.9 at ``ca_lr``, batches of ``ca_batch_size``, LogitNorm with
    temperature ``logit_tau`` (paper 0.1); ``cov_ridge`` regularises each covariance before sampling.
    """
    return [SLCAPlugin(slow_factor, ca_epochs, ca_samples, ca_lr, ca_batch_size, logit_tau, cov_ridge)]
