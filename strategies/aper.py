"""APER: adapt the pre-trained model on the first session, then merge it with the pre-trained one.

Zhou, Cai, Ye and Zhan, "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024; arXiv 2303.07338, first named ADAM, later APER). The method:

1. on the first incremental session only, adapt the pre-trained model (PTM) to the downstream data with a
   parameter-efficient module (the paper's variants: adapters, SSF, VPT) or full fine-tuning, with a
   classification head trained alongside and then dropped;
2. freeze both models; a sample's representation is the concatenation ``[phi(x), phi*(x)]`` of the
   pre-trained and the adapted features (generalisability from the PTM, adaptivity from the adapted model);
3. classify with a prototype head: each class's prototype is the mean concatenated feature of its training
   samples, logits are cosine similarities (as SimpleCIL). No further training after the first session.

``adapt`` (defaults follow the paper where the CPU allows):
- ``adapter`` (default): a residual bottleneck adapter on the backbone's output features,
  ``phi*(x) = phi(x) + s * up(ReLU(down(phi(x))))`` with the up-projection initialised to zero, s = 0.1 and
  bottleneck 64 (AdaptFormer's defaults; the paper's adapter variant is AdaptFormer). Deviation: the paper
  inserts an adapter into every transformer block; one adapter after the backbone leaves a frozen backbone's
  features cached, so adapting costs no backbone pass (EfficientNet-Lite0 on a CPU), and it works on any
  backbone. It trains against a cosine classifier with a learnable scale (as in the authors' code), which is
  then dropped. It has far less leverage than adapters in every block: the cosine head's gradient reaches the
  features divided by their norm (~30 for EfficientNet-Lite0) and the adapter's output is scaled by 0.1, so at
  the paper's lr 0.01 it barely moves (features change by ~3e-4 relative on Split-MNIST's first two digits)
  and APER equals SimpleCIL. ``aper_feature_shift`` in metrics.json reports that change. ``adapter_scale: 1.0``
  with lr 0.01-0.1 lets it adapt; whether that helps depends on the first session (experiments/aper_diagnose.py
  and pretrained_more_check.py: -2 to 0 points with two first-session classes, +7 with six; ``film`` at the
  paper's lr: +0.6 with two, +8.6 with six).
- ``film``: a per-channel scale and shift after every normalisation layer (SSF-like, the paper's SSF variant
  up to where the scales sit), ``body``: full fine-tuning (the paper's finetune variant). Both keep a frozen
  copy of the pre-trained model for ``phi`` (its bytes count in ``memory_bytes``) and train the model's own
  linear head during adaptation.
- ``vpt``: visual prompt tuning (Jia et al. ECCV 2022), the paper's VPT-shallow variant: ``prompt_length``
  learnable tokens (the authors' 5) inserted after the [CLS] token of a frozen ``vit``; ``phi*`` is the prompted
  [CLS] feature. Only ``vit`` has tokens to prompt; VPT-deep is not implemented.
Adaptation trains with ``train.*`` (epochs, optimizer, lr) on the first experience with cross-entropy.

Task-IL comes from the evaluator's masking of the same logits. Features are computed per stream key through
the backbones' caches, so file-backed streams embed each image once per model; no sample is stored.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import SampleFeatureCache, sample_keys
from cltoolbox.params import Interval, Positive
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import (
    ClassMeans,
    FixedExtractorPlugin,
    adapt_first_experience,
    freeze,
    require_features_and_head,
    train_on,
)


class FeatureAdapter(nn.Module):
    """Residual bottleneck adapter ``f + scale * up(ReLU(down(f)))``; ``up`` starts at zero, so the adapted
    features start equal to the pre-trained ones."""

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.scale * self.up(F.relu(self.down(f)))


class CosineHead(nn.Module):
    """``sigma * cos(f, w_c)`` with a learnable scale ``sigma`` (starting at 1): the head the adapter trains
    against in the authors' code (PILOT's cosine classifier), dropped after the first session."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-dim ** -0.5, dim ** -0.5))
        self.sigma = nn.Parameter(torch.ones(()))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.normalize(f, dim=1) @ F.normalize(self.weight, dim=1).T


class APERPlugin(FixedExtractorPlugin):
    method = "aper"

    def __init__(self, adapt: str, bottleneck: int, adapter_scale: float, scale: float,
                 prompt_length: int = 5) -> None:
        super().__init__(adapt)
        self.bottleneck, self.adapter_scale, self.scale = bottleneck, adapter_scale, scale
        self.prompt_length = prompt_length
        self.prompts: nn.Parameter | None = None  # vpt: (length, embed_dim) tokens after [CLS]
        self.stats = ClassMeans()  # sums/counts of the concatenated features
        self.adapter: FeatureAdapter | None = None
        self.adapt_head: CosineHead | None = None  # adapter mode: trained with the adapter, then dropped
        self.pretrained: nn.Module | None = None  # film/body: the frozen PTM beside the adapted model
        self._pre_state: dict | None = None  # its weights, kept for checkpoints (rebuilt lazily on resume)
        self._pre_cache = SampleFeatureCache()
        self._adapting = False
        self._adapter_state: dict | None = None
        self.shift: float | None = None  # mean ||phi*(x) - phi(x)|| / ||phi(x)|| on the first experience

    def check(self, model, stream) -> None:
        if self.adapt == "vpt" and not (callable(getattr(model, "encode", None)) and hasattr(model, "pool")):
            raise ConfigError("strategy.adapt: vpt inserts prompt tokens into a transformer; use model vit, or "
                              "adapt: adapter / film / body")
        if self.adapt in ("adapter", "vpt"):
            require_features_and_head(model, "aper")
            return
        super().check(model, stream)

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        if self.adapt == "adapter" and self.adapter is None:
            # initialised from the run's seed, not the learner's generator: a resumed run calls before_fit
            # again after its generator was restored, and must not draw from it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(learner.seed)
                dim = learner.model.head.in_features
                self.adapter = FeatureAdapter(dim, self.bottleneck, self.adapter_scale)
                self.adapt_head = CosineHead(dim, self.n_classes)
            self.adapter.to(learner.device)
            self.adapt_head.to(learner.device)
            if self._adapter_state is not None:  # resumed: load_state_dict ran before before_fit
                self._load_adapter(self._adapter_state)
        if self.adapt == "vpt" and self.adapt_head is None:
            model = learner.model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(learner.seed)
                dim = model.head.in_features
                patch = model.backbone.patch_embed.patch_size
                bound = (6.0 / (3 * patch[0] * patch[1] + dim)) ** 0.5  # VPT's uniform (Xavier-style) init
                prompts = torch.empty(self.prompt_length, dim).uniform_(-bound, bound)
                self.adapt_head = CosineHead(dim, self.n_classes)
            if self.prompts is None:  # not restored from a checkpoint
                self.prompts = nn.Parameter(prompts.to(learner.device))
            self.adapt_head.to(learner.device)

    def _load_adapter(self, state: dict) -> None:
        self.adapter.load_state_dict(state)
        self.adapter.requires_grad_(False)
        self.adapt_head.requires_grad_(False)
        self.adapter.eval()

    # -- the first session: adaptation ------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        if self.adapter is not None:
            return [*self.adapter.parameters(), *self.adapt_head.parameters()]
        if self.prompts is not None:
            return [self.prompts, *self.adapt_head.parameters()]
        return []

    def _prompted(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The ViT's pooled feature with the prompt tokens inserted after [CLS]."""
        return model.pool(model.encode(x, prompts=self.prompts.expand(x.shape[0], -1, -1)))

    def forward(self, learner, x, t):
        if not self._adapting:
            return None
        if self.adapt == "vpt":
            return self.adapt_head(self._prompted(learner.model, x))
        return self.adapt_head(self.adapter(learner.model.features(x)))

    def adapt_first(self, learner, exp) -> None:
        model = learner.model
        if self.adapt in ("adapter", "vpt"):
            freeze(model)  # the backbone stays as it is (cached if it can); only the adapter/prompts and head train
            self._adapting = True
            try:
                train_on(learner, exp)
            finally:
                self._adapting = False
            self.adapt_head.requires_grad_(False)
            if self.adapter is not None:
                self.adapter.requires_grad_(False)
                self.adapter.eval()
            else:
                self.prompts.requires_grad_(False)
            return
        self.pretrained = copy.deepcopy(model)  # the PTM as it is before adaptation
        freeze(self.pretrained)
        self.pretrained.eval()
        self._pre_state = {k: v for k, v in self.pretrained.state_dict().items()}
        adapt_first_experience(learner, exp, self.adapt)

    def train_experience(self, learner, exp) -> bool:
        if exp.index == 0:
            self.adapt_first(learner, exp)
            self._cache.clear()
        freeze(learner.model)
        feats = self.stream_features(learner, learner.stream.keys(exp.train))
        if exp.index == 0:
            pre, adapted = feats.double().chunk(2, dim=1)
            self.shift = float(((adapted - pre).norm(dim=1) / pre.norm(dim=1).clamp_min(1e-12)).mean())
        self.stats.add(feats, exp.y_train, self.n_classes)
        return True

    # -- features --------------------------------------------------------------------------------------
    def _pretrained_model(self, learner) -> nn.Module:
        if self.pretrained is None:  # resumed run: the PTM's weights come from the checkpoint
            self.pretrained = copy.deepcopy(learner.model)
            self.pretrained.load_state_dict(self._pre_state)
            freeze(self.pretrained)
            self.pretrained.eval()
        return self.pretrained

    @staticmethod
    def _model_features(model: nn.Module, x: torch.Tensor, cache: SampleFeatureCache) -> torch.Tensor:
        if getattr(model, "frozen", False):  # the model caches its frozen features itself
            return model.features(x).flatten(1)
        return cache(x, lambda rows: model.features(rows).flatten(1))

    def concat_features(self, learner, x: torch.Tensor) -> torch.Tensor:
        """``[phi(x), phi*(x)]`` (eval mode, no gradients; cached per stream key where the keys are known)."""
        f = self._model_features(learner.model, x, self._cache)
        if self.adapt == "adapter":
            return torch.cat((f, self.adapter(f)), dim=1)
        if self.adapt == "vpt":  # the prompted features, cached per stream key (the backbone is frozen)
            return torch.cat((f, self._cache(x, lambda rows: self._prompted(learner.model, rows))), dim=1)
        pre = self._model_features(self._pretrained_model(learner), x, self._pre_cache)
        return torch.cat((pre, f), dim=1)

    @torch.no_grad()
    def stream_features(self, learner, keys: torch.Tensor) -> torch.Tensor:
        was_training = learner.model.training
        learner.model.eval()
        out = []
        for k, x in learner.batches(keys):
            with sample_keys(k, learner.stream):
                out.append(self.concat_features(learner, x))
        learner.model.train(was_training)
        return torch.cat(out)

    # -- prediction --------------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.stats.sums is not None

    def predict(self, learner, x, task_ids):
        if not self.ready():
            return None
        return self.logits(self.concat_features(learner, x)).to(torch.float32)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(feats.double(), dim=1) @ F.normalize(self.stats.means(), dim=1).T
        return (self.scale * cos).masked_fill(~self.stats.seen, MASKED_LOGIT)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = dict(self.stats.state())
        if self.adapter is not None:
            state["adapter"] = self.adapter.state_dict()
        if self.prompts is not None:
            state["prompts"] = self.prompts.detach()
        if self._pre_state is not None:
            state["pretrained"] = self._pre_state
        if self.shift is not None:
            state["shift"] = self.shift
        return state

    def load_state_dict(self, state: dict) -> None:
        self.stats.load(state)
        if "adapter" in state:
            self._adapter_state = dict(state["adapter"])
            if self.adapter is not None:
                self._load_adapter(self._adapter_state)
        if "pretrained" in state:
            self._pre_state, self.pretrained = dict(state["pretrained"]), None
        if "prompts" in state:
            self.prompts = nn.Parameter(state["prompts"].clone(), requires_grad=False)
        self.shift = float(state["shift"]) if "shift" in state else None
        self._cache.clear()
        self._pre_cache.clear()

    def report(self, learner, stream) -> dict[str, float]:
        """``aper_feature_shift``: mean ||phi*(x) - phi(x)|| / ||phi(x)|| over the first experience's training
        data. Near 0 the adaptation did nothing and APER equals SimpleCIL (see experiments/aper_diagnose.py)."""
        return {} if self.shift is None else {"aper_feature_shift": self.shift}

    def memory_usage(self) -> tuple[int, int]:
        """Seen classes; bytes of the prototype sums, the adapter or the pre-trained model's copy."""
        if not self.ready():
            return 0, 0
        extra = (tensor_bytes(*self.adapter.parameters()) if self.adapter is not None
                 else tensor_bytes(self.prompts) if self.prompts is not None
                 else tensor_bytes(*(self._pre_state or {}).values()))
        return int(self.stats.seen.sum()), tensor_bytes(self.stats.sums, self.stats.counts) + extra


@register_strategy("aper")
def aper(adapt: Literal["adapter", "film", "body", "vpt"] = "adapter",
         bottleneck: Annotated[int, Interval(1, 65536)] = 64, adapter_scale: Positive = 0.1, scale: Positive = 1.0,
         prompt_length: Annotated[int, Interval(1, 1024)] = 5) -> list[Plugin]:
    """APER (Zhou et al., IJCV 2024): adapt on experience 1, concatenate PTM + adapted features, prototypes.

    ``adapt``: "adapter" (residual bottleneck adapter on the backbone's features, ``bottleneck`` units, output
    scaled by ``adapter_scale``: AdaptFormer's 64 and 0.1), "film" (scale and shift after every normalisation
    layer, SSF-like), "body" (fine-tuning) or "vpt" (``prompt_length`` prompt tokens after [CLS] of a ``vit``,
    VPT-shallow; the authors' 5); trained with ``train.*`` on the first experience. ``scale`` multiplies the
    cosine logits (changes no prediction).
    """
    return [APERPlugin(adapt, bottleneck, adapter_scale, scale, prompt_length)]
