"""RanPAC: random projections of frozen features and a class-prototype ridge-regression head.

McDonnell, Gong, Parvaneh, Abbasnejad and van den Hengel, "RanPAC: Random Projections and Pre-trained Models
for Continual Learning", NeurIPS 2023. The method, as the paper describes it:

1. (optional, "phase 1") adapt the pre-trained model on the first session only, then freeze it;
2. draw a random projection ``P`` (d x M, entries N(0, 1)) once and never train it; a sample's representation
   is ``h = ReLU(f(x) P)``, lifting the d-dimensional features to M dimensions where classes become more
   linearly separable;
3. accumulate, over every training sample seen so far, the Gram matrix ``G = sum h h^T`` (M x M) and the
   class-prototype matrix ``C = sum h y^T`` (M x K, one-hot ``y``): row c of ``C^T`` is class c's prototype in
   the projected space. Both are plain sums, so the order and chunking of the data do not matter;
4. the head is the ridge-regression solution ``W = (G + lambda I)^-1 C``; logits are ``h W``, which decorrelates
   the class prototypes (the paper's point: nearest-mean on correlated features is what loses accuracy).
   ``lambda`` is chosen at every experience from a logarithmic grid by the mean squared error on a held-out
   split (the paper's 80:20) of the experience's training data, with ``G`` and ``C`` of everything else; the
   head is then solved with all of the data.

Defaults and where they deviate from the paper:
- ``projection_dim`` 2000 (paper: M = 10,000). ``G`` costs M^2 float64 bytes (32 MB at 2000, 800 MB at 10,000)
  and each lambda search an M x M eigendecomposition (~2.6 s at 2000 on one CPU thread, ~30 s at 4000); 2000
  is the CPU-sane choice. Set it higher on a GPU or a big machine.
- ``adapt: none`` (paper: first-session parameter-efficient adaptation, e.g. adapters or SSF). Adapting
  EfficientNet-Lite0 on a CPU is slow; ``adapt: film`` (a per-channel scale and shift after every
  normalisation layer, the SSF-like choice) or ``body`` runs phase 1 with ``train.*``.
- ``lambdas``: 10^-8 ... 10^13 in decades. The paper searches a logarithmic grid; this span is our choice,
  wide enough that the selected value (10^3 ... 10^5 on EfficientNet-Lite0 features) is never at an end.

Task-IL comes from the evaluator's masking of the same logits. Features of a frozen backbone are cached per
sample by stream key, so file-backed streams embed each image once; no sample is stored.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, Positive
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import FixedExtractorPlugin

DEFAULT_LAMBDAS = [10.0 ** e for e in range(-8, 14)]
_CHUNK = 4096  # rows projected at a time: the M-dimensional activations of a whole experience never coexist


class RanPACPlugin(FixedExtractorPlugin):
    method = "ranpac"
    # DDP: first-session adaptation trains through the loop (sharded like naive); the projection, the statistics
    # and the held-out split come from full-experience passes and the shared generator, alike on every rank
    supports_ddp = True

    def __init__(self, adapt: str, projection_dim: int, lambdas: list[float], val_fraction: float) -> None:
        super().__init__(adapt)
        self.projection_dim = projection_dim
        self.lambdas = sorted(float(v) for v in lambdas)
        self.val_fraction = val_fraction
        self.projection: torch.Tensor | None = None  # d x M, float32, drawn once from the learner's generator
        self.gram: torch.Tensor | None = None  # M x M, float64: sum h h^T
        self.prototypes: torch.Tensor | None = None  # M x K, float64: sum h y^T
        self.counts: torch.Tensor | None = None  # K, samples seen per class
        self.lam = 0.0
        self.chosen: list[float] = []  # lambda selected at each experience (reported)
        self._w: torch.Tensor | None = None

    # -- statistics -----------------------------------------------------------------------------------
    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """``ReLU(f P)`` in float32."""
        return F.relu(feats.float() @ self.projection)

    def statistics(self, feats: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum h h^T, sum h y^T) of ``feats``, float64, accumulated over row chunks."""
        m = self.projection_dim
        gram = torch.zeros(m, m, dtype=torch.float64, device=feats.device)
        protos = torch.zeros(m, self.n_classes, dtype=torch.float64, device=feats.device)
        for s in range(0, feats.shape[0], _CHUNK):
            h = self.project(feats[s : s + _CHUNK]).double()
            gram += h.T @ h
            protos.index_add_(1, y[s : s + _CHUNK], h.T)
        return gram, protos

    def update(self, learner, feats: torch.Tensor, y: torch.Tensor) -> None:
        if self.projection is None:
            p = torch.randn(feats.shape[1], self.projection_dim, generator=learner.generator)
            self.projection = p.to(feats.device)
            self.gram = torch.zeros(self.projection_dim, self.projection_dim, dtype=torch.float64,
                                    device=feats.device)
            self.prototypes = torch.zeros(self.projection_dim, self.n_classes, dtype=torch.float64,
                                          device=feats.device)
            self.counts = torch.zeros(self.n_classes, dtype=torch.float64, device=feats.device)
        gram, protos = self.statistics(feats, y)
        n = int(y.shape[0])
        n_val = round(self.val_fraction * n)
        if len(self.lambdas) > 1 and 0 < n_val < n:
            val = torch.randperm(n, generator=learner.generator)[:n_val].to(feats.device)
            g_val, c_val = self.statistics(feats[val], y[val])
            fit_gram, fit_protos = self.gram + gram - g_val, self.prototypes + protos - c_val
            self.lam = select_lambda(fit_gram, fit_protos, self.project(feats[val]).double(),
                                     F.one_hot(y[val], self.n_classes).double(), self.lambdas)
        elif not self.chosen:  # too few samples to hold any out: the middle of the grid (or its only value);
            self.lam = self.lambdas[len(self.lambdas) // 2]  # later experiences keep the previous choice
        self.chosen.append(self.lam)
        self.gram += gram
        self.prototypes += protos
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self._w = None

    def head(self) -> torch.Tensor:
        """The ridge solution ``(G + lambda I)^-1 C`` (M x K, float64), solved lazily and kept."""
        if self._w is None:
            self._w = ridge_solve(self.gram, self.prototypes, self.lam)
        return self._w

    # -- prediction -----------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.gram is not None

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.project(feats).double() @ self.head()
        return out.masked_fill(~(self.counts > 0), MASKED_LOGIT)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.gram is None:
            return {}
        return {"projection": self.projection, "gram": self.gram, "prototypes": self.prototypes,
                "counts": self.counts, "lam": self.lam, "chosen": list(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        if "gram" in state:
            self.projection, self.gram = state["projection"], state["gram"]
            self.prototypes, self.counts = state["prototypes"], state["counts"]
            self.lam, self.chosen = float(state["lam"]), [float(v) for v in state["chosen"]]
            self._w = None

    def memory_usage(self) -> tuple[int, int]:
        """Seen classes; bytes of the projection, the Gram matrix, the prototypes and the ridge head."""
        if self.gram is None:
            return 0, 0
        head = self.prototypes.numel() * self.prototypes.element_size()  # W, the same shape (whether solved yet)
        return int((self.counts > 0).sum()), tensor_bytes(self.projection, self.gram, self.prototypes,
                                                          self.counts) + head

    def report(self, learner, stream) -> dict[str, float]:
        return {f"ranpac_lambda_exp{i}": v for i, v in enumerate(self.chosen)}


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """``(gram + lam I)^-1 targets`` by Cholesky (``gram`` is symmetric positive semi-definite)."""
    reg = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0:
        return torch.cholesky_solve(targets, factor)
    return torch.linalg.lstsq(reg, targets).solution  # lam too small for the rounding in gram: least squares


def select_lambda(gram: torch.Tensor, targets: torch.Tensor, h_val: torch.Tensor, y_val: torch.Tensor,
                  lambdas: list[float]) -> float:
    """The ``lambda`` of the grid whose ridge head (fitted on ``gram``, ``targets``) has the lowest mean squared
    error on the held-out (``h_val``, one-hot ``y_val``); the first of ties. One eigendecomposition serves the
    whole grid: W(lambda) = Q diag(1 / (e + lambda)) Q^T C."""
    evals, vecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0)
    a, b = h_val @ vecs, vecs.T @ targets
    errors = [float(((a / (evals + lam)) @ b - y_val).pow(2).mean()) for lam in lambdas]
    return lambdas[min(range(len(lambdas)), key=errors.__getitem__)]


@register_strategy("ranpac", test_params={"projection_dim": 200})
def ranpac(adapt: Literal["none", "body", "film"] = "none", projection_dim: Annotated[int, Interval(1, 100_000)] = 2000,
           lambdas: list[Positive] = DEFAULT_LAMBDAS,  # noqa: B006
           val_fraction: Annotated[float, Interval(0, 1, high_open=True)] = 0.2) -> list[Plugin]:
    """RanPAC (McDonnell et al., NeurIPS 2023): frozen random ReLU projection + Gram-matrix ridge head.

    ``projection_dim``: M, the projected dimension (paper 10,000; 2000 here for CPU: G is M^2 float64).
    ``lambdas``: ridge grid searched at every experience by held-out MSE on ``val_fraction`` of its training
    data (paper: 80:20); one value disables the search. ``adapt``: first-session adaptation ("film": a
    scale and shift after every normalisation layer, SSF-like; "body": fine-tuning; "none": frozen, default
    on CPU), trained with ``train.*``.
    """
    if not lambdas:
        raise ConfigError("strategy.lambdas: must be a non-empty list of values > 0; e.g. [1.0, 100.0]")
    return [RanPACPlugin(adapt, projection_dim, list(lambdas), val_fraction)]
