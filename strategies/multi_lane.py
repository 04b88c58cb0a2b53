"""MULTI-LANE: one independent pathway ("lane") per task over summarised patch tokens of a frozen ViT.

De Min, Mancini, Lathuilière, Roy and Ricci, CoLLAs 2024, "Less is more: Summarizing Patch Tokens for efficient
Multi-Label Class-Incremental Learning" (MULTI-LANE). Prompt selection is ambiguous when one image holds objects
of several tasks, so MULTI-LANE keeps no selection at all: every task gets its own lane, and at inference all
lanes run side by side, each scoring its own task's classes. A lane must be cheap, so it does not process the
image's N patch tokens: its patch selectors summarise them into a few tokens.

The frozen ViT runs once per image over all its tokens (no gradient, shared by every lane). A lane of task t
(classes C_t), all parameters its own, trained only while t trains and frozen after:

- patch selectors S_t (n_selectors x d), carried through the blocks as tokens of the lane's sequence;
- its token(s), initialised from the pretrained [CLS]: one per class of C_t (``token: class``, the default
  here) or one for the task (``token: task``, the paper's);
- task prompts: key/value prefixes of ``prompt_length`` in each block of ``layers`` (prefix tuning);
- a binary classifier per class (class c reads its own token, or the task token).

In every block the lane's normalised selectors summarise that block's normalised frozen input (all N + 1 tokens):
summary k = sum_n softmax_n(<x_n, s_k> / sqrt(d)) x_n; the lane's tokens attend over [themselves; summaries]
(+ prefixes); the summaries' outputs are dropped and the selectors carried on in their place ("drop and
replace", the paper's PreT_Attention), then the block's MLP runs on the lane's tokens and selectors. So a lane
reads every depth of the frozen ViT at the price of |tokens| + n_selectors tokens per block. The final norm,
an L2 normalisation (the paper's "pre-head" normalisation) and the classifier give class c's logit
<w_c, h/|h|> + b_c. Training task t runs lane t alone with sigmoid BCE on C_t's labels (summed over C_t,
averaged over the batch); earlier lanes are never touched, so nothing they learnt is forgotten, and the missing
past labels of new images (the MLCIL protocol) never reach them. A new lane starts from the previous lane's
selectors, prefixes and tokens (``warm_start``, the paper's ``next_task``); selectors and prefixes are drawn
with orthonormal rows (``init: orthogonal``, the paper's). Inference stacks every trained lane along the batch
dimension and runs one pass (lanes of equal class count together), then writes each lane's logits into its
classes' columns. On a single-label stream the same lanes train with cross-entropy over the current task's
classes (the paper shows MULTI-LANE in class-IL too).

``drop_and_replace: false`` summarises once, at the input of block ``summarise_at``, and runs the lane's
[tokens; summaries] through the blocks from there (the paper's ablation without drop and replace).
``summarise_at`` (default 0) lets lanes start at a later block: blocks before it run once, frozen and shared.

Facts from the authors' code (github.com/tdemin16/multi-lane, VOC config): plain BCE (``BCEWithLogitsLoss``, no
asymmetric loss), a frozen [CLS] per lane, 10 selectors, 10 prefixes in the first 5 of 12 blocks, Adam with lr 0.05 at
batch 256 and a cosine schedule, 30 epochs on VOC. Different here: the lane tokens are trainable, one per class
by default (on mnist5k_grid validation, 2 seeds, mean final mAP 0.322 vs 0.315 for one task token: within
seed noise), and the defaults (16 selectors, prefixes of 4 in every block) are ours for a 4-block ViT on 56 px
digit grids; the schedule is the run's ``train:`` section. Results against l2p (mnist5k_grid, 3 and 5 seeds,
lr and epochs chosen on held-out training data for both): experiments/multilabel_check.py.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.vit import Prefix, ViTClassifier, prefix_attention
from cltoolbox.multilabel import bce_loss
from cltoolbox.params import Min, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.prompt_base import TINY_VIT

_INIT_SEED = 104_729


def _orthogonal(rows: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``rows`` x ``d`` with orthonormal rows (orthonormal columns when rows > d), from a seeded QR: the paper
    code's ``nn.init.orthogonal_`` for selectors and prompts."""
    a = torch.randn(max(rows, d), min(rows, d), generator=gen)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    return q if rows >= d else q.T


class Lane(nn.Module):
    """One task's parameters: selectors (k, d), the lane's token(s) (1 per task or 1 per class, d), prefixes
    (layers, 2, length, d), a classifier row and bias per class."""

    def __init__(self, n_classes: int, n_tokens: int, n_selectors: int, n_layers: int, prompt_length: int,
                 cls: torch.Tensor, gen: torch.Generator, init: str) -> None:
        super().__init__()
        d = cls.shape[-1]
        if init == "orthogonal":
            sel = _orthogonal(n_selectors, d, gen)
            pre = _orthogonal(n_layers * 2 * prompt_length, d, gen).reshape(n_layers, 2, prompt_length, d)
        else:
            sel = torch.randn(n_selectors, d, generator=gen)
            pre = torch.randn(n_layers, 2, prompt_length, d, generator=gen) * 0.02
        self.selectors = nn.Parameter(sel)
        self.tokens = nn.Parameter(cls.reshape(1, d).repeat(n_tokens, 1)
                                   + torch.randn(n_tokens, d, generator=gen) * 0.02)
        self.prefixes = nn.Parameter(pre)
        self.weight = nn.Parameter(torch.zeros(n_classes, d))
        self.bias = nn.Parameter(torch.zeros(n_classes))


class MultiLanePlugin(Plugin):
    supports_multi_label = True

    def __init__(self, n_selectors: int, prompt_length: int, layers: list[int] | None, summarise_at: int = 0,
                 drop_and_replace: bool = True, token: str = "class", warm_start: bool = True,
                 normalize: bool = True, init: str = "orthogonal") -> None:
        self.n_selectors, self.prompt_length, self.layers = n_selectors, prompt_length, layers
        self.summarise_at, self.drop_and_replace, self.token = summarise_at, drop_and_replace, token
        self.warm_start, self.normalize, self.init = warm_start, normalize, init
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
                Lane(len(e.classes), 1 if self.token == "task" else len(e.classes), self.n_selectors,
                     len(self.layer_ids), self.prompt_length, cls, gen, self.init)
                for e in stream.experiences).to(learner.device)
            self.classes = [torch.tensor(e.classes, dtype=torch.long, device=learner.device)
                            for e in stream.experiences]
            if self._pending is not None:
                self._restore(self._pending)

    def before_experience(self, learner, exp) -> None:
        self.current = exp.index
        t = exp.index
        if self.warm_start and 0 < t == self.trained:  # a new lane starts where the previous one ended
            new, old = self.lanes[t], self.lanes[t - 1]
            with torch.no_grad():
                new.selectors.copy_(old.selectors)
                new.prefixes.copy_(old.prefixes)
                if new.tokens.shape == old.tokens.shape:
                    new.tokens.copy_(old.tokens)

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
    def _prefixes(self, params: list[Lane], B: int, dtype: torch.dtype) -> dict[int, Prefix]:
        pre = torch.stack([p.prefixes for p in params]).to(dtype)  # (L, layers, 2, len, d)
        L, d = pre.shape[0], pre.shape[-1]
        out = {}
        for j, layer in enumerate(self.layer_ids):
            kv = pre[:, j, :, None].expand(L, 2, B, self.prompt_length, d)
            out[layer] = (kv[:, 0].reshape(L * B, self.prompt_length, d),
                          kv[:, 1].reshape(L * B, self.prompt_length, d))
        return out

    def _run(self, model: ViTClassifier, x: torch.Tensor, lanes: list[int]) -> torch.Tensor:
        """Logits (len(lanes), batch, classes per lane) of lanes with equal class counts, in one pass."""
        L, B, start = len(lanes), x.shape[0], self.summarise_at
        blocks = model.backbone.blocks
        with torch.no_grad():  # frozen, shared by every lane
            h = model.run_blocks(model.tokens(x), stop=start)  # the sequence entering block `start`
            if self.drop_and_replace:  # each lane block's normalised input sequence: what its selectors read
                ctx = {}
                for i in range(start, model.depth):
                    ctx[i] = blocks[i].norm1(h)
                    h = blocks[i](h)
            else:
                patches = h[:, model.backbone.num_prefix_tokens:]
        params = [self.lanes[i] for i in lanes]
        dtype = h.dtype
        d = h.shape[-1]
        tok = torch.stack([p.tokens for p in params]).to(dtype)  # (L, m, d)
        sel = torch.stack([p.selectors for p in params]).to(dtype)  # (L, k, d)
        m, k = tok.shape[1], sel.shape[1]
        prefixes = self._prefixes(params, B, dtype)
        if self.drop_and_replace:
            seq = torch.cat((tok[:, None].expand(L, B, m, d), sel[:, None].expand(L, B, k, d)), 2)
            seq = seq.reshape(L * B, m + k, d)
            for i in range(start, model.depth):
                seq = _lane_block(blocks[i], seq, m, ctx[i], prefixes.get(i))
            h = model.backbone.norm(seq[:, :m])
        else:
            summary = _summarise(sel, patches)
            seq = torch.cat((tok[:, None].expand(L, B, m, d), summary), dim=2).reshape(L * B, -1, d)
            h = model.run_blocks(seq, prefixes, start=start)[:, :m]
        h = h.reshape(L, B, m, d)
        if self.normalize:
            h = F.normalize(h, dim=-1)
        w = torch.stack([p.weight for p in params]).to(h.dtype)
        b = torch.stack([p.bias for p in params]).to(h.dtype)
        if m == 1:  # one lane token read by every class head of the lane
            logits = torch.einsum("lbd,lcd->lbc", h[:, :, 0], w)
        else:  # class c's head reads class c's token
            logits = torch.einsum("lbmd,lmd->lbm", h, w)
        return logits + b[:, None]

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


def _summarise(sel: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Summary tokens (L, B, k, d): per selector, a softmax(<ctx_n, s> / sqrt(d))-weighted sum of ``ctx``
    (B, N, d); ``sel`` is (L, k, d) or per image (L, B, k, d)."""
    d = ctx.shape[-1]
    if sel.dim() == 3:
        attn = torch.einsum("bnd,lkd->lbkn", ctx, sel)
    else:
        attn = torch.einsum("bnd,lbkd->lbkn", ctx, sel)
    return torch.einsum("lbkn,bnd->lbkd", (attn / math.sqrt(d)).softmax(-1), ctx)


def _lane_block(blk: nn.Module, seq: torch.Tensor, m: int, ctx: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """One frozen block on a lane's sequence [m lane tokens; k selectors] (L*B, m + k, d) with "drop and replace"
    (the paper code's PreT_Attention): the normalised selectors summarise ``ctx`` (B, N, d, this block's
    normalised frozen input), the lane tokens attend over [themselves; the summaries] (+ the lane's prefixes),
    the summaries' outputs are dropped and the selectors carried on in their place."""
    n = blk.norm1(seq)
    LB, _, d = n.shape
    B = ctx.shape[0]
    sel = n[:, m:]
    summary = _summarise(sel.reshape(LB // B, B, -1, d), ctx).reshape(LB, -1, d)
    inp = torch.cat((n[:, :m], summary), dim=1)
    out = blk.attn(inp) if prefix is None else prefix_attention(blk.attn, inp, prefix)
    seq = seq + blk.drop_path1(blk.ls1(torch.cat((out[:, :m], sel), dim=1)))
    return seq + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(seq))))


@register_strategy("multi_lane", test_params={"n_selectors": 2, "prompt_length": 2}, test_model=TINY_VIT)
def multi_lane(n_selectors: PositiveInt = 16, prompt_length: PositiveInt = 4, layers: list[int] | None = None,
               summarise_at: Annotated[int, Min(0, why="a block index; 0: patch embeddings")] = 0,
               drop_and_replace: bool = True, token: Literal["class", "task"] = "class", warm_start: bool = True,
               normalize: bool = True, init: Literal["orthogonal", "normal"] = "orthogonal") -> list[Plugin]:
    """MULTI-LANE (De Min et al. 2024): per-task lanes over summarised patch tokens on a frozen ViT."""
    return [MultiLanePlugin(n_selectors, prompt_length, None if layers is None else list(layers), summarise_at,
                            drop_and_replace, token, warm_start, normalize, init)]
