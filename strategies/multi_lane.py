"""MULTI-LANE: one independent pathway ("lane") per task over summarised patch tokens of a frozen ViT.

De Min, Mancini, Lathuilière, Roy and Ricci, CoLLAs 2024, "Less is more: Summarizing Patch Tokens for efficient
Multi-Label Class-Incremental Learning" (MULTI-LANE). Prompt selection is ambiguous when one image holds objects
of several tasks, so MULTI-LANE keeps no selection at all: every task gets its own lane, and at inference all
lanes run side by side, each scoring its own task's classes. A lane must be cheap, so it does not process the
image's N patch tokens: its patch selectors summarise them into a few tokens first.

A lane of task t (classes C_t), all parameters its own, trained only while t trains and frozen after:

- patch selectors S_t (n_selectors x d): summary token k = sum_n softmax_n(<p_n, s_k> / sqrt(d)) p_n over the
  frozen patch embeddings p_n (patch embedding + position, the ViT's input tokens): a few convex combinations
  of the patches, so the lane's self-attention runs on |C_t| + n_selectors tokens instead of N + 1;
- one class token per class of C_t, initialised from the pretrained [CLS] token;
- task prompts: key/value prefixes of ``prompt_length`` in each block of ``layers`` (prefix tuning);
- a binary classifier per class reading that class's token at the output.

The sequence [class tokens; summary tokens] runs through the frozen blocks with the lane's prefixes; class c's
logit is <w_c, h_c> + b_c. Training task t runs lane t alone with sigmoid BCE on C_t's labels (summed over
C_t, averaged over the batch); earlier lanes are never touched, so nothing they learnt is forgotten, and the
missing past labels of new images (the MLCIL protocol) never reach them. Inference stacks every trained lane
along the batch dimension and runs one pass (lanes of equal class count together), then writes each lane's
logits into its classes' columns. On a single-label stream the same lanes train with cross-entropy over the
current task's classes (the paper shows MULTI-LANE in class-IL too).

``summarise_at`` (default 0: the patch embeddings) lets the lanes start at a later block instead: blocks before
it run once, frozen and shared, over the full token sequence, and the selectors summarise that block's input.

Simplified at this scale: no asymmetric loss (plain BCE), one selector count for every lane, and the defaults
(16 selectors, prefixes of 4 in every block, selectors drawn N(0, 1)) are ours for a 4-block ViT on 56 px
digit grids, not the paper's ViT-B/16 settings.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.vit import ViTClassifier
from cltoolbox.multilabel import bce_loss
from cltoolbox.params import Min, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.prompt_base import TINY_VIT

_INIT_SEED = 104_729


class Lane(nn.Module):
    """One task's parameters: selectors, class tokens, prefixes (layers, 2, length, d), classifier."""

    def __init__(self, n_classes: int, n_selectors: int, n_layers: int, prompt_length: int, cls: torch.Tensor,
                 gen: torch.Generator) -> None:
        super().__init__()
        d = cls.shape[-1]
        # unit-variance selectors: their attention over the patches is peaked from the start, so the summary
        # tokens differ (a near-zero init makes every one the mean patch, and they separate slowly)
        self.selectors = nn.Parameter(torch.randn(n_selectors, d, generator=gen))
        self.class_tokens = nn.Parameter(cls.reshape(1, d).repeat(n_classes, 1)
                                         + torch.randn(n_classes, d, generator=gen) * 0.02)
        self.prefixes = nn.Parameter(torch.randn(n_layers, 2, prompt_length, d, generator=gen) * 0.02)
        self.weight = nn.Parameter(torch.zeros(n_classes, d))
        self.bias = nn.Parameter(torch.zeros(n_classes))


class MultiLanePlugin(Plugin):
    supports_multi_label = True

    def __init__(self, n_selectors: int, prompt_length: int, layers: list[int] | None, summarise_at: int = 0) -> None:
        self.n_selectors, self.prompt_length, self.layers = n_selectors, prompt_length, layers
        self.summarise_at = summarise_at
        self.lanes: nn.ModuleList | None = None
        self.classes: list[torch.Tensor] = []  # per lane, its class ids
        self.trained = 0  # lanes trained so far (lane t = experience t)
        self.current: int | None = None
        self._pending: dict | None = None

    def check(self, model, stream) -> None:
        if not isinstance(model, ViTClassifier):
            raise ConfigError("strategy: multi_lane runs lanes through a Vision Transformer; set model.name: vit")
        if not 0 <= self.summarise_at < model.depth:
            raise ConfigError(f"strategy.summarise_at: block {self.summarise_at} does not exist in a ViT of depth "
                              f"{model.depth}; use 0..{model.depth - 1} (0: the patch embeddings)")
        bad = [i for i in (self.layers or []) if not self.summarise_at <= i < model.depth]
        if bad:
            raise ConfigError(f"strategy.layers: block {bad[0]} is not one a lane runs (blocks {self.summarise_at}.."
                              f"{model.depth - 1} of this ViT); use blocks in that range")

    # -- hooks -----------------------------------------------------------------------------------------
    def before_fit(self, learner, stream) -> None:
        model = learner.model
        self.check(model, stream)
        model.set_frozen(True)
        if self.lanes is None:
            self.layer_ids = list(range(self.summarise_at, model.depth)) if self.layers is None else list(self.layers)
            gen = torch.Generator().manual_seed(learner.seed * 1_000_003 + _INIT_SEED)
            cls = model.backbone.cls_token.detach().float().cpu()
            self.lanes = nn.ModuleList(
                Lane(len(e.classes), self.n_selectors, len(self.layer_ids), self.prompt_length, cls, gen)
                for e in stream.experiences).to(learner.device)
            self.classes = [torch.tensor(e.classes, dtype=torch.long, device=learner.device)
                            for e in stream.experiences]
            if self._pending is not None:
                self._restore(self._pending)

    def before_experience(self, learner, exp) -> None:
        self.current = exp.index

    def after_experience(self, learner, exp) -> None:
        self.trained = max(self.trained, exp.index + 1)
        self.current = None

    def forward(self, learner, x, t):
        lane = self.current
        logits = self._run(learner.model, x, [lane])
        out = logits.new_full((x.shape[0], learner.stream.n_classes), MASKED_LOGIT)
        return out.index_copy(1, self.classes[lane], logits[0])

    def criterion(self, learner, batch, logits):
        cls = self.classes[self.current]
        if learner.stream.multi_label:
            return bce_loss(logits, batch.y, cls)
        return F.cross_entropy(logits, batch.y)  # the other classes hold MASKED_LOGIT: CE over the task's

    def predict(self, learner, x, task_ids):
        if self.lanes is None or self.trained == 0:
            return None
        out = torch.full((x.shape[0], learner.stream.n_classes), MASKED_LOGIT, device=x.device)
        by_size: dict[int, list[int]] = {}
        for lane in range(self.trained):
            by_size.setdefault(len(self.classes[lane]), []).append(lane)
        for lanes in by_size.values():  # lanes with as many classes run as one batch
            logits = self._run(learner.model, x, lanes).float()
            for i, lane in enumerate(lanes):
                out[:, self.classes[lane]] = logits[i]
        return out

    # -- the lanes -------------------------------------------------------------------------------------
    def _run(self, model: ViTClassifier, x: torch.Tensor, lanes: list[int]) -> torch.Tensor:
        """Logits (len(lanes), batch, classes per lane) of lanes with equal class counts, in one pass."""
        L, B = len(lanes), x.shape[0]
        with torch.no_grad():  # frozen, shared by every lane: the patch tokens entering block summarise_at
            tokens = model.tokens(x)
            if self.summarise_at > 0:
                tokens = model.run_blocks(tokens, stop=self.summarise_at)
            patches = tokens[:, model.backbone.num_prefix_tokens:]  # (B, N, d)
        d = patches.shape[-1]
        params = [self.lanes[i] for i in lanes]
        sel = torch.stack([p.selectors for p in params])  # (L, k, d)
        attn = torch.einsum("bnd,lkd->lbkn", patches, sel.to(patches.dtype)) / math.sqrt(d)
        summary = torch.einsum("lbkn,bnd->lbkd", attn.softmax(-1), patches)  # (L, B, k, d)
        cls = torch.stack([p.class_tokens for p in params]).to(patches.dtype)  # (L, m, d)
        m = cls.shape[1]
        seq = torch.cat((cls[:, None].expand(L, B, m, d), summary), dim=2).reshape(L * B, -1, d)
        pre = torch.stack([p.prefixes for p in params]).to(patches.dtype)  # (L, layers, 2, len, d)
        prefixes = {}
        for j, layer in enumerate(self.layer_ids):
            kv = pre[:, j, :, None].expand(L, 2, B, self.prompt_length, d)
            prefixes[layer] = (kv[:, 0].reshape(L * B, self.prompt_length, d),
                               kv[:, 1].reshape(L * B, self.prompt_length, d))
        h = model.run_blocks(seq, prefixes, start=self.summarise_at)[:, :m].reshape(L, B, m, d)
        w = torch.stack([p.weight for p in params]).to(h.dtype)
        b = torch.stack([p.bias for p in params]).to(h.dtype)
        return torch.einsum("lbmd,lmd->lbm", h, w) + b[:, None]

    # -- bookkeeping -----------------------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        # every lane is listed; only the training lane gets gradients (the others are not in its forward),
        # and optimizers skip tensors without a gradient, so finished lanes stay exactly as they were
        return [] if self.lanes is None else list(self.lanes.parameters())

    def cost(self) -> dict[str, float]:
        return {"lane_params": sum(p.numel() for p in self.parameters())}

    def state_dict(self) -> dict:
        if self.lanes is None:
            return {} if self._pending is None else self._pending
        return {"lanes": self.lanes.state_dict(), "trained": self.trained}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending = state
            if self.lanes is not None:
                self._restore(state)

    def _restore(self, state: dict) -> None:
        self.lanes.load_state_dict(state["lanes"])
        self.trained = int(state["trained"])
        self._pending = None


@register_strategy("multi_lane", test_params={"n_selectors": 2, "prompt_length": 2}, test_model=TINY_VIT)
def multi_lane(n_selectors: PositiveInt = 16, prompt_length: PositiveInt = 4, layers: list[int] | None = None,
               summarise_at: Annotated[int, Min(0, why="a block index; 0: patch embeddings")] = 0) -> list[Plugin]:
    """MULTI-LANE (De Min et al. 2024): per-task lanes over summarised patch tokens on a frozen ViT."""
    return [MultiLanePlugin(n_selectors, prompt_length, None if layers is None else list(layers), summarise_at)]
