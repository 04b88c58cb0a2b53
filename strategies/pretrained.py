"""Class-incremental learning on a fixed (pre-trained or first-experience-adapted) feature extractor.

Three replay-free methods that never train the backbone after the first experience and classify from
class statistics of ``model.features(x)``. They work with any model that has ``features(x)`` and a linear
``head`` (the built-in ``mlp``, ``resnet18_reduced``, ``efficientnet_lite0`` and ``vit``).

* ``simplecil`` - Zhou, Cai, Ye and Zhan 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models:
  Generalizability and Adaptivity are All You Need" (IJCV 2024; the PILOT toolbox's SimpleCIL): frozen
  backbone, each class's prototype = mean feature, cosine-similarity classifier. No SGD.
* ``fsa`` - Panos, Kobe, Reino, Aljundi and Turner, ICCV 2023, "First Session Adaptation: A Strong Replay-Free
  Baseline for Class-Incremental Learning": adapt the extractor on the first experience only (``adapt``), then
  freeze it and classify with an incrementally updated LDA head (class means + shared covariance, exact).
* ``fetril`` - Petit, Popescu, Schindler, Picard and Delezoide, WACV 2023, "FeTrIL: Feature Translation for
  Exemplar-Free Class-Incremental Learning": extractor frozen after the first experience; past classes are
  represented by pseudo-features = features of a new class translated by (past centroid - new centroid);
  a linear classifier is re-trained at every experience on real (new) + pseudo (past) features.

Feature computation: once the extractor is frozen, each experience's training set goes through it in one
batched pass (``eval_batch_size`` samples fetched at a time, ``learner.batches``), and features are cached per
sample (``SampleFeatureCache``; a frozen ``efficientnet_lite0`` or ``vit`` caches them itself, by stream key),
so every image is embedded once per run.

Checkpoints hold only tensors (sums, counts, Gram matrix, classifier weights) and numbers; the adapted
backbone is part of the model's state, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from cltoolbox.params import NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import ClassMeans, FixedExtractorPlugin

if TYPE_CHECKING:
    pass

# -- SimpleCIL -------------------------------------------------------------------------------------------
class SimpleCILPlugin(FixedExtractorPlugin):
    method = "simplecil"
    supports_ddp = True  # no SGD: prototypes from full-experience passes

    def __init__(self, scale: float) -> None:
        super().__init__("none")
        self.scale = scale
        self.stats = ClassMeans()

    def update(self, learner, feats, y) -> None:
        self.stats.add(feats, y, self.n_classes)

    def ready(self) -> bool:
        return self.stats.sums is not None

    def prototypes(self) -> torch.Tensor:
        return self.stats.means()

    def logits(self, feats):
        cos = F.normalize(feats.double(), dim=1) @ F.normalize(self.prototypes(), dim=1).T
        return (self.scale * cos).masked_fill(~self.stats.seen, MASKED_LOGIT)

    def state_dict(self):
        return self.stats.state()

    def load_state_dict(self, state) -> None:
        self.stats.load(state)

    def memory_usage(self):
        return int(self.stats.seen.sum()) if self.ready() else 0, tensor_bytes(self.stats.sums, self.stats.counts)


@register_strategy("simplecil")
def simplecil(scale: Positive = 1.0) -> list[Plugin]:
    """SimpleCIL (Zhou et al. 2023): frozen backbone, class-mean prototypes, cosine classifier; no SGD.

    ``scale`` multiplies the cosine logits (it changes no prediction, only logit-based metrics).
    """
    return [SimpleCILPlugin(scale)]


# -- FSA (incremental LDA) ---------------------------------------------------------------------------------
class IncrementalLDA:
    """Streaming LDA statistics: class sums/counts and the total second moment sum(x x^T), all float64.

    The pooled within-class covariance of everything seen so far is recovered exactly:
        S_w = sum x x^T - sum_c n_c mu_c mu_c^T,  Sigma = S_w / (N - K)
    so adding data in any chunking gives the same classifier as a batch fit on all of it.
    """

    def __init__(self) -> None:
        self.means = ClassMeans()
        self.gram: torch.Tensor | None = None

    def add(self, feats: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
        f = feats.double()
        self.means.add(f, y, n_classes)
        g = f.T @ f
        self.gram = g if self.gram is None else self.gram + g

    def covariance(self) -> torch.Tensor:
        m = self.means
        n, k = m.counts.sum(), m.seen.sum()
        within = self.gram - (m.sums.T @ m.means())  # sum_c n_c mu_c mu_c^T = sums^T means
        return within / (n - k).clamp_min(1)

    def classifier(self, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LDA weights (K, d) and biases (K,) with Sigma + shrinkage * (tr(Sigma)/d) I; equal class priors."""
        cov = self.covariance()
        d = cov.shape[0]
        ridge = shrinkage * cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + ridge * torch.eye(d, dtype=cov.dtype, device=cov.device)
        mu = self.means.means()
        w = torch.linalg.solve(cov, mu.T).T  # Sigma^-1 mu_c
        b = -0.5 * (w * mu).sum(1)
        return w, b

    def state(self) -> dict:
        return {} if self.gram is None else {**self.means.state(), "gram": self.gram}

    def load(self, state: dict) -> None:
        if "gram" in state:
            self.means.load(state)
            self.gram = state["gram"]


class FSAPlugin(FixedExtractorPlugin):
    method = "fsa"

    def __init__(self, adapt: str, shrinkage: float) -> None:
        super().__init__(adapt)
        self.shrinkage = shrinkage
        self.lda = IncrementalLDA()
        self._w: torch.Tensor | None = None
        self._b: torch.Tensor | None = None

    def update(self, learner, feats, y) -> None:
        self.lda.add(feats, y, self.n_classes)
        self._w = None

    def ready(self) -> bool:
        return self.lda.gram is not None

    def logits(self, feats):
        if self._w is None:  # derived from the statistics; recomputed lazily (also after a resume)
            self._w, self._b = self.lda.classifier(self.shrinkage)
        return (feats.double() @ self._w.T + self._b).masked_fill(~self.lda.means.seen, MASKED_LOGIT)

    def state_dict(self):
        return self.lda.state()

    def load_state_dict(self, state) -> None:
        self.lda.load(state)
        self._w = None

    def memory_usage(self):
        if not self.ready():
            return 0, 0
        return int(self.lda.means.seen.sum()), tensor_bytes(self.lda.gram, self.lda.means.sums, self.lda.means.counts)


@register_strategy("fsa")
def fsa(adapt: Literal["none", "body", "film"] = "body", shrinkage: NonNegative = 1e-4) -> list[Plugin]:
    """First Session Adaptation (Panos et al., ICCV 2023): adapt on experience 1, then incremental LDA head.

    ``adapt``: "body" fine-tunes the whole model (backbone + head) on the first experience with ``train.*``
    (the paper's FSA); "film" trains FiLM adapters (a per-channel scale and shift after every normalisation
    layer, as in FiT, Shysheya et al. ICLR 2023, which FSA follows) plus the head, with the pre-trained
    normalisation statistics kept; "none" keeps the
    backbone as it is (a pre-trained frozen extractor). ``shrinkage``: ridge on the shared covariance,
    Sigma + shrinkage * (trace(Sigma)/d) I, keeping the LDA solvable when features outnumber samples.
    """
    return [FSAPlugin(adapt, shrinkage)]


# -- FeTrIL ------------------------------------------------------------------------------------------------
def translate(new_feats: torch.Tensor, new_centroid: torch.Tensor, past_centroid: torch.Tensor) -> torch.Tensor:
    """FeTrIL's pseudo-features of a past class: f(new) + mu(past) - mu(new)."""
    return new_feats + (past_centroid - new_centroid)


class FeTrILPlugin(FixedExtractorPlugin):
    method = "fetril"

    def __init__(self, adapt: str, steps: int, lr: float, weight_decay: float) -> None:
        super().__init__(adapt)
        self.steps, self.lr, self.weight_decay = steps, lr, weight_decay
        self.centroids = ClassMeans()
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def pseudo_features(self, feats: torch.Tensor, y: torch.Tensor,
                        past: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each past class, the features of the most similar new class (cosine of centroids), translated."""
        mu = self.centroids.means().to(feats.dtype)
        new = y.unique()
        sim = F.normalize(mu[past], dim=1) @ F.normalize(mu[new], dim=1).T
        xs, ys = [], []
        for i, p in enumerate(past):
            c = new[sim[i].argmax()]
            xs.append(translate(feats[y == c], mu[c], mu[p]))
            ys.append(torch.full((xs[-1].shape[0],), p, dtype=y.dtype, device=y.device))
        return torch.cat(xs), torch.cat(ys)

    def update(self, learner, feats, y) -> None:
        past = torch.nonzero(self.centroids.seen).flatten().tolist() if self.centroids.sums is not None else []
        self.centroids.add(feats, y, self.n_classes)
        past = [p for p in past if p not in set(y.unique().tolist())]
        x, t = feats.float(), y
        if past:
            px, py = self.pseudo_features(feats.float(), y, past)
            x, t = torch.cat((x, px)), torch.cat((t, py))
        self.weight, self.bias = self.fit_linear(x, t)

    def fit_linear(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax linear classifier on L2-normalised features, full-batch Adam from zero (deterministic),
        re-trained from scratch at every experience as the paper re-trains its LinearSVC."""
        x = F.normalize(x, dim=1)
        seen = self.centroids.seen
        w = torch.zeros(self.n_classes, x.shape[1], device=x.device, requires_grad=True)
        b = torch.zeros(self.n_classes, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = (x @ w.T + b).masked_fill(~seen, MASKED_LOGIT)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return w.detach(), b.detach()

    def ready(self) -> bool:
        return self.weight is not None

    def logits(self, feats):
        z = F.normalize(feats.float(), dim=1) @ self.weight.T + self.bias
        return z.masked_fill(~self.centroids.seen, MASKED_LOGIT)

    def state_dict(self):
        if self.weight is None:
            return {}
        return {**self.centroids.state(), "weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state) -> None:
        self.centroids.load(state)
        if "weight" in state:
            self.weight, self.bias = state["weight"], state["bias"]

    def memory_usage(self):
        if not self.ready():
            return 0, 0
        return int(self.centroids.seen.sum()), tensor_bytes(self.centroids.sums, self.centroids.counts,
                                                            self.weight, self.bias)


@register_strategy("fetril")
def fetril(adapt: Literal["none", "body"] = "body", steps: PositiveInt = 300, lr: Positive = 0.01,
           weight_decay: float = 0.0) -> list[Plugin]:
    """FeTrIL (Petit et al., WACV 2023): frozen extractor, pseudo-features by centroid translation, linear head.

    ``adapt: body`` trains the model on the first experience (the paper trains its extractor on the initial
    state), ``none`` keeps a pre-trained extractor frozen. The paper's LinearSVC is replaced by a softmax
    linear layer trained full-batch (``steps`` Adam steps at ``lr``) on L2-normalised real + pseudo features,
    re-trained from scratch at every experience.
    """
    return [FeTrILPlugin(adapt, steps, lr, weight_decay)]
