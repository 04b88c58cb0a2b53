"""The machinery of strategies on a fixed (pre-trained or first-experience-adapted) feature extractor: batched
feature passes over in-memory inputs or stream samples, freezing, first-experience adaptation (whole body, or
FiLM: the normalisation layers' affine parameters), the ``FixedExtractorPlugin`` base class (adapt, embed each
experience once, classify from features), exact running class means, and two small helpers (``train_on``: the
standard loop over one experience; ``class_mask``). Used by pretrained.py (simplecil, fsa, fetril), ranpac, aper,
ease, icarl, lucir, slca, merging, prompt_base."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import SampleFeatureCache, sample_keys
from cltoolbox.plugin import Plugin

if TYPE_CHECKING:
    from cltoolbox.stream import Stream

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def _features(model: nn.Module, chunks: Iterable[tuple[torch.Tensor | None, torch.Tensor]], stream: Stream | None,
              device: torch.device) -> torch.Tensor:
    """``model.features`` of each (keys, inputs) chunk in eval mode, flattened and concatenated (restores the
    previous mode); chunks with keys are looked up by key in a frozen extractor's cache."""
    was_training = model.training
    model.eval()
    out = []
    for keys, x in chunks:
        with sample_keys(keys, stream):
            out.append(model.features(x).flatten(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model.features`` of in-memory inputs ``x`` in eval mode, flattened, ``batch_size`` rows at a time."""
    chunks = ((None, x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size))
    return _features(model, chunks, None, x.device)


def stream_features(learner, keys: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """``learner.model.features`` of the stream samples ``keys``, fetched ``batch_size`` (default
    ``eval_batch_size``) at a time: a whole experience never needs to be in memory at once."""
    return _features(learner.model, learner.batches(keys, batch_size), learner.stream, learner.device)


def freeze(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` (and tell a model that caches frozen features)."""
    if hasattr(model, "set_frozen"):
        model.set_frozen(True)
    model.requires_grad_(False)


def _normalise_in_eval_mode(module: nn.Module, _inputs) -> None:
    module.train(False)


def train_on(learner, exp) -> None:
    """One pass of the standard training loop over ``exp``'s training data, with its task id."""
    learner.train_data(learner.stream.keys(exp.train), exp.y_train, torch.full_like(exp.y_train, exp.task_id))


def class_mask(n_classes: int, classes, device) -> torch.Tensor:
    """Bool over ``n_classes``: True at ``classes``."""
    mask = torch.zeros(n_classes, dtype=torch.bool, device=device)
    mask[list(classes)] = True
    return mask


def adapt_first_experience(learner, exp, adapt: str) -> None:
    """Train on the first experience with the standard loop: the whole model ("body"), or FiLM adapters plus
    the head ("film", see ``fsa``); "none" trains nothing."""
    if adapt == "none":
        return
    model = learner.model
    if hasattr(model, "set_frozen"):
        model.set_frozen(False)
    if adapt == "body":
        model.requires_grad_(True)
        train_on(learner, exp)
        return
    # FiLM (Perez et al. 2018) as FiT/FSA apply it to a pre-trained network: a per-channel scale and shift after
    # every normalisation layer, i.e. the layers' affine parameters, with the normalisation statistics kept.
    norms = [m for m in model.modules() if isinstance(m, _NORM_LAYERS) and getattr(m, "weight", None) is not None]
    model.requires_grad_(False)
    for m in norms:
        m.requires_grad_(True)
    model.head.requires_grad_(True)
    # running statistics stay the pre-trained ones: these layers normalise in eval mode during adaptation
    hooks = [m.register_forward_pre_hook(_normalise_in_eval_mode)
             for m in norms if isinstance(m, nn.modules.batchnorm._NormBase)]
    try:
        train_on(learner, exp)
    finally:
        for h in hooks:
            h.remove()


def require_features_and_head(model: nn.Module, method: str) -> None:
    """ConfigError (one line) unless ``model`` has ``features(x)`` and a linear ``head``."""
    if not callable(getattr(model, "features", None)) or not isinstance(getattr(model, "head", None), nn.Linear):
        raise ConfigError(f"strategy: {method} needs a model with features(x) and a linear head; use model mlp, "
                          "resnet18_reduced, efficientnet_lite0 or vit")


class FixedExtractorPlugin(Plugin):
    """Shared machinery: optional first-experience adaptation, feature passes, cached prediction."""

    method = "fixed-extractor"

    def __init__(self, adapt: str = "none") -> None:
        self.adapt = adapt
        self.n_classes = 0
        self._cache = SampleFeatureCache()

    def check(self, model, stream) -> None:
        require_features_and_head(model, self.method)
        if self.adapt == "film" and not any(isinstance(m, _NORM_LAYERS) for m in model.modules()):
            raise ConfigError("strategy.adapt: film modulates normalisation layers and this model has none; use "
                              "adapt: body or a model with normalisation layers (resnet18_reduced, "
                              "efficientnet_lite0, vit)")

    def before_fit(self, learner, stream) -> None:
        self.check(learner.model, stream)
        self.n_classes = stream.n_classes

    def train_experience(self, learner, exp) -> bool:
        if exp.index == 0:
            adapt_first_experience(learner, exp, self.adapt)
            self._cache.clear()  # the extractor may have changed; it is fixed from now on
        freeze(learner.model)  # idempotent; also re-applied after a resume
        feats = stream_features(learner, learner.stream.keys(exp.train))
        self.update(learner, feats, exp.y_train)
        return True

    def predict(self, learner, x, task_ids):
        if not self.ready():
            return None  # nothing learned yet (evaluation before the first experience): the model's logits
        # the loop already batches and switches the model to eval mode for prediction
        model = learner.model
        if getattr(model, "frozen", False):  # the model caches its own frozen features
            feats = model.features(x).flatten(1)
        else:
            feats = self._cache(x, lambda rows: model.features(rows).flatten(1))
        return self.logits(feats).to(torch.float32)

    # subclass API
    def update(self, learner, feats: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassMeans:
    """Exact running per-class feature sums and counts (float64)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, feats: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
        f = feats.double()
        if self.sums is None:
            self.sums = torch.zeros(n_classes, f.shape[1], dtype=torch.float64, device=f.device)
            self.counts = torch.zeros(n_classes, dtype=torch.float64, device=f.device)
        self.sums.index_add_(0, y, f)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    @property
    def seen(self) -> torch.Tensor:
        return self.counts > 0

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def state(self) -> dict:
        return {} if self.sums is None else {"sums": self.sums, "counts": self.counts}

    def load(self, state: dict) -> None:
        if "sums" in state:
            self.sums, self.counts = state["sums"], state["counts"]
