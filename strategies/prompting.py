"""Prompt-based continual learning on a frozen Vision Transformer (``model: {name: vit}``).

* ``l2p`` - Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy and Pfister, CVPR 2022, "Learning to Prompt for
  Continual Learning": a shared pool of prompts with learnable keys; the query is the frozen backbone's [CLS]
  feature; the top-N prompts by key-query cosine are prepended to the input tokens (prompt tuning); a
  surrogate loss pulls the selected keys toward the query; the classifier reads the average of the prompt
  tokens' outputs. Optional selection diversification (the paper's Eq. 4): during training, prompts used by
  earlier tasks are penalised by their selection frequency, so new tasks claim unused prompts.
* ``dualprompt`` - Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy and Pfister, ECCV 2022,
  "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning": a shared G-prompt in the
  early blocks and one E-prompt per task in later blocks, both attached by prefix tuning; training uses the
  current task's E-prompt and pulls its key toward the queries; inference picks the E-prompt whose key best
  matches the query. Rehearsal-free.
* ``coda_prompt`` - Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris and Kira, CVPR 2023,
  "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning": each
  prompt is a weighted sum of learned components, the weight of component m being cos(q * A_m, K_m) with a
  learned attention vector A_m and key K_m; every task gets a new slice of components, initialised orthogonal
  (Gram-Schmidt) to the earlier ones, which are then frozen; optional orthogonality penalty.

Common to the three: the backbone is frozen (its [CLS] features, the queries, are cached per sample by the
model), the trainable tensors are the prompts/keys (owned by the plugin, in every optimizer through
``parameters()``) and the model's linear head. Only the current task's allotment of the prompt tensors may
change while it trains: DualPrompt's G-prompt and the task's E-prompt and key; CODA-Prompt's slice of
components, keys and attention vectors; L2P's pool entries (prompt and key) that a batch of the current task
has selected. The pools are single tensors in the optimizer, so weight decay (AdamW's decoupled decay, Adam's
and SGD's L2 term) would move every row, zero gradient or not; the entries outside the allotment are put back
after every optimizer step (``after_step``), bit for bit, so earlier tasks' prompts stay as they were
learned under any optimizer. Training logits are restricted to the current experience's classes
(``train_mask``, as in the authors' class-incremental code), so the head's rows of the other classes get no
gradient: with ``train_mask`` they are put back after every step too. Inference masks classes not seen
yet. One task = one experience. ``selected_task(learner, x)`` tells which task's prompts an input selects.

Defaults follow the authors' released configurations: L2P pool 10, length 5, top-5, pull 0.1; DualPrompt
G-prompt length 5 in blocks 0-1, E-prompt length 5 in blocks 2-4, pull 1.0; CODA-Prompt 100 components of
length 8 in blocks 0-4, orthogonality weight 0 (their updated code relies on the orthogonal initialisation).
They trained with Adam; set ``train.optimizer: adam`` (the examples do).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from cltoolbox import distributed
from cltoolbox.errors import ConfigError
from cltoolbox.models.vit import Prefix
from cltoolbox.params import Min, NonNegative, PositiveInt
from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.prompt_base import TINY_VIT, PromptPlugin, gather_rows, key_cosine, uniform_init

Pull = Annotated[float, Min(0, why="0 disables the key-query loss")]  # weight of the key-query loss


# ---------------------------------------------------------------------------------------------------- L2P
class L2PPool(nn.Module):
    def __init__(self, pool: int, length: int, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        self.prompts = uniform_init(gen, pool, length, dim)
        self.keys = uniform_init(gen, pool, dim)


class L2PPlugin(PromptPlugin):
    method = "l2p"
    # DDP: prompt, key and head gradients all-reduced by the loop; allotments per experience and selection
    # counts summed over ranks
    supports_ddp = True
    supports_multi_label = True  # its head is the loop's: BCE over the seen classes on multi-label streams

    def __init__(self, pool_size: int, prompt_length: int, top_k: int, pull: float, diversify: bool,
                 train_mask: bool) -> None:
        super().__init__(pull, train_mask)
        self.pool_size, self.prompt_length, self.top_k, self.diversify = pool_size, prompt_length, top_k, diversify
        self.usage: torch.Tensor | None = None  # (tasks, pool): selections while training each task

    def build(self, model, n_tasks, gen):
        device = model.head.weight.device  # selection counts stay beside the keys: no per-batch copy
        self.usage = torch.zeros(n_tasks, self.pool_size, dtype=torch.float64, device=device)
        return L2PPool(self.pool_size, self.prompt_length, model.embed_dim, gen)

    def select(self, cos: torch.Tensor, task: int | None) -> torch.Tensor:
        """Top-k prompts by key-query cosine; while training task > 0 with ``diversify``, by distance
        weighted with how often earlier tasks selected each prompt (the paper's Eq. 4)."""
        if task and self.diversify:
            freq = self.usage[:task].sum(0)
            h = (freq / freq.sum()).to(cos)
            return ((1 - cos) * h).topk(self.top_k, dim=1, largest=False).indices
        return cos.topk(self.top_k, dim=1).indices

    def prompted(self, model, x, task):
        q = model.features(x)
        cos = key_cosine(q, self.module.keys)
        idx = self.select(cos, task)
        prompts = gather_rows(self.module.prompts, idx).flatten(1, 2)  # (batch, top_k * length, dim)
        h = model.encode(x, prompts=prompts)
        feats = h[:, 1 : 1 + prompts.shape[1]].mean(1)  # the prompt tokens' outputs
        if task is None:
            return feats, 0.0
        # the global batch's selections (summed over ranks under DDP), so every rank grows the same allotment
        self.usage[task] += distributed.all_reduce_sum(torch.bincount(idx.flatten(), minlength=self.pool_size).double())
        return feats, self.pull * (1 - cos.gather(1, idx)).sum(1).mean()

    def frozen(self, name, tensor, task):
        # the pool entries no batch of this task has selected so far (usage counts this step's selection)
        return (self.usage[task] == 0).view(-1, *[1] * (tensor.dim() - 1))

    def selected_task(self, learner, x):
        with torch.no_grad():
            cos = key_cosine(learner.model.features(x), self.module.keys)
            owner = self.usage.argmax(0)  # the task that trained each prompt most
            return owner[cos.argmax(1)]

    def extra_state(self):
        return {"usage": self.usage.clone()}

    def load_extra(self, state):
        self.usage.copy_(state["usage"])


@register_strategy("l2p", test_model=TINY_VIT)
def l2p(pool_size: PositiveInt = 10, prompt_length: PositiveInt = 5, top_k: PositiveInt = 5, pull: Pull = 0.1,
        diversify: bool = True, train_mask: bool = True) -> list[Plugin]:
    """Learning to Prompt (Wang et al. 2022): key-matched prompt pool on a frozen ViT."""
    if top_k > pool_size:
        raise ConfigError(f"strategy.top_k: {top_k} exceeds pool_size {pool_size}; lower top_k")
    return [L2PPlugin(pool_size, prompt_length, top_k, pull, diversify, train_mask)]


# --------------------------------------------------------------------------------------------- DualPrompt
class DualPromptPool(nn.Module):
    def __init__(self, n_g: int, g_length: int, pool: int, n_e: int, e_length: int, dim: int,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.g = uniform_init(gen, n_g, 2, g_length, dim)  # (layer, key/value, length, dim)
        self.e = uniform_init(gen, pool, n_e, 2, e_length, dim)
        self.keys = uniform_init(gen, pool, dim)


class DualPromptPlugin(PromptPlugin):
    method = "dualprompt"
    # DDP: prompt, key and head gradients all-reduced by the loop; allotments per experience
    supports_ddp = True

    def __init__(self, g_layers: list[int], g_length: int, e_layers: list[int], e_length: int,
                 pool_size: int | None, pull: float, train_mask: bool) -> None:
        super().__init__(pull, train_mask)
        self.g_layers, self.g_length, self.e_layers, self.e_length = g_layers, g_length, e_layers, e_length
        self.pool_size = pool_size

    def check(self, model, stream) -> None:
        super().check(model, stream)
        self.check_blocks("g_layers", self.g_layers, model)
        self.check_blocks("e_layers", self.e_layers, model)
        if self.pool_size is not None and self.pool_size < len(stream):
            raise ConfigError(f"strategy.pool_size: {self.pool_size} E-prompts for {len(stream)} tasks; use >= "
                              f"{len(stream)} or leave it unset (one per task)")

    def build(self, model, n_tasks, gen):
        pool = self.pool_size or n_tasks
        return DualPromptPool(len(self.g_layers), self.g_length, pool, len(self.e_layers), self.e_length,
                              model.embed_dim, gen)

    def prefixes(self, slots: torch.Tensor, batch: int) -> dict[int, Prefix]:
        out: dict[int, list[torch.Tensor]] = {}
        for i, layer in enumerate(self.g_layers):
            out[layer] = [self.module.g[i, 0].expand(batch, -1, -1), self.module.g[i, 1].expand(batch, -1, -1)]
        e = gather_rows(self.module.e, slots)  # (batch, layers, 2, length, dim)
        for j, layer in enumerate(self.e_layers):
            k, v = e[:, j, 0], e[:, j, 1]
            if layer in out:  # a block with both prompts gets both prefixes
                k, v = torch.cat((out[layer][0], k), 1), torch.cat((out[layer][1], v), 1)
            out[layer] = [k, v]
        return {layer: (k, v) for layer, (k, v) in out.items()}

    def prompted(self, model, x, task):
        q = model.features(x)
        cos = key_cosine(q, self.module.keys)
        if task is None:
            slots = cos.argmax(1)
        else:
            slots = torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)
        feats = model.pool(model.encode(x, prefixes=self.prefixes(slots, x.shape[0])))
        if task is None:
            return feats, 0.0
        return feats, self.pull * (1 - cos[:, task]).mean()

    def frozen(self, name, tensor, task):
        if name == "g":
            return None  # the shared G-prompt trains on every task
        other = torch.arange(tensor.shape[0], device=tensor.device) != task  # E-prompts and keys: one per task
        return other.view(-1, *[1] * (tensor.dim() - 1))

    def selected_task(self, learner, x):
        with torch.no_grad():
            return key_cosine(learner.model.features(x), self.module.keys).argmax(1)


@register_strategy("dualprompt", test_params={"g_layers": [0], "e_layers": [1]}, test_model=TINY_VIT)
def dualprompt(g_layers: list[int] = [0, 1], g_length: PositiveInt = 5, e_layers: list[int] = [2, 3, 4],  # noqa: B006
               e_length: PositiveInt = 5, pool_size: int | None = None, pull: Pull = 1.0,
               train_mask: bool = True) -> list[Plugin]:
    """DualPrompt (Wang et al. 2022): shared G-prompt + key-matched task E-prompts, prefix-tuned."""
    return [DualPromptPlugin(list(g_layers), g_length, list(e_layers), e_length, pool_size, pull, train_mask)]


# -------------------------------------------------------------------------------------------- CODA-Prompt
def _orthogonalgather_rows(existing: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random unit rows orthogonal to the rows of ``existing`` and to each other (Gram-Schmidt against an
    orthonormal basis of ``existing``, float64)."""
    dim = existing.shape[1]
    if existing.shape[0]:
        basis = torch.linalg.qr(existing.double().T).Q.T  # (rows, dim), orthonormal
    else:
        basis = torch.empty(0, dim, dtype=torch.float64)
    out = []
    while len(out) < n:
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        for _ in range(2):  # twice is enough for full float64 orthogonality
            v = v - basis.T @ (basis @ v)
        norm = v.norm()
        if norm < 1e-6:  # drawn inside the span (cannot happen below the dimension; redraw)
            continue
        v = v / norm
        basis = torch.cat((basis, v[None]))
        out.append(v)
    return torch.stack(out).float()


class CodaPool(nn.Module):
    def __init__(self, n_layers: int, pool: int, length: int, dim: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n_layers, pool, length, dim))  # components
        self.k = nn.Parameter(torch.zeros(n_layers, pool, dim))  # keys
        self.a = nn.Parameter(torch.zeros(n_layers, pool, dim))  # attention vectors


class CodaPromptPlugin(PromptPlugin):
    method = "coda_prompt"
    # DDP: prompt, key and head gradients all-reduced by the loop; allotments per experience
    supports_ddp = True

    def __init__(self, pool_size: int, prompt_length: int, layers: list[int], ortho: float,
                 train_mask: bool) -> None:
        super().__init__(0.0, train_mask)
        self.pool_size, self.prompt_length, self.layers, self.ortho = pool_size, prompt_length, layers, ortho
        self.per_task = 0
        self.trained = 0  # tasks whose component slices are in use
        self.seed = 0

    def check(self, model, stream) -> None:
        super().check(model, stream)
        n_tasks = len(stream)
        self.check_blocks("layers", self.layers, model)
        if self.pool_size > model.embed_dim:
            raise ConfigError(f"strategy.pool_size: {self.pool_size} components cannot be mutually orthogonal in "
                              f"the backbone's {model.embed_dim} dimensions; use pool_size <= {model.embed_dim}")
        if self.pool_size < n_tasks:
            raise ConfigError(f"strategy.pool_size: {self.pool_size} components for {n_tasks} tasks; use >= "
                              f"{n_tasks} (the paper uses 100 for 10 tasks)")

    def build(self, model, n_tasks, gen):
        self.per_task = self.pool_size // n_tasks
        self.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return CodaPool(len(self.layers), self.pool_size, self.prompt_length, model.embed_dim)

    @torch.no_grad()
    def prepare(self, learner, exp) -> None:
        t = exp.index
        if t < self.trained:  # resumed after this slice was initialised
            return
        lo, hi = t * self.per_task, (t + 1) * self.per_task
        gen = torch.Generator().manual_seed(self.seed + t)
        m = self.module
        for layer in range(len(self.layers)):  # new slice orthogonal to the earlier ones (Sec. 3.2)
            for tensor in (m.p, m.k, m.a):
                flat = tensor[layer].flatten(1)
                flat[lo:hi] = _orthogonalgather_rows(flat[:lo].cpu(), hi - lo, gen).to(flat)
        self.trained = t + 1

    def frozen(self, name, tensor, task):
        pos = torch.arange(tensor.shape[1], device=tensor.device)  # (layers, components, ...): dim 1
        other = (pos < task * self.per_task) | (pos >= (task + 1) * self.per_task)
        return other.view(1, -1, *[1] * (tensor.dim() - 2))

    def _slices(self, tensor: torch.Tensor, task: int | None) -> torch.Tensor:
        """Components in use: earlier tasks' frozen, the current task's trainable."""
        if task is None:
            return tensor[:, : self.trained * self.per_task]
        lo, hi = task * self.per_task, (task + 1) * self.per_task
        return torch.cat((tensor[:, :lo].detach(), tensor[:, lo:hi]), dim=1)

    def weights(self, q: torch.Tensor, task: int | None) -> torch.Tensor:
        """alpha (layers, batch, components) = cos(q * A_m, K_m) (Eq. 5 of the paper).

        Written as three contractions over the feature dimension, as F.cosine_similarity computes it
        (x . y / max(|x| |y|, 1e-8)), so q * A_m (layers x batch x components x dim, ~390 MB per batch of 256
        with ViT-B's defaults) is never formed."""
        k, a = self._slices(self.module.k, task), self._slices(self.module.a, task)
        dot = torch.einsum("bd,lmd->lbm", q, a * k)
        aq_norm = torch.einsum("bd,lmd->lbm", q.square(), a.square()).sqrt()
        return dot / (aq_norm * k.norm(dim=-1)[:, None, :]).clamp_min(1e-8)

    def prompted(self, model, x, task):
        q = model.features(x)
        alpha = self.weights(q, task)
        p = self._slices(self.module.p, task)
        prompts = torch.einsum("lbm,lmcd->lbcd", alpha, p)  # (layers, batch, length, dim)
        half = self.prompt_length // 2  # first half prefixes the keys, second half the values
        prefixes = {layer: (prompts[i, :, :half], prompts[i, :, half:]) for i, layer in enumerate(self.layers)}
        feats = model.pool(model.encode(x, prefixes=prefixes))
        if task is None or self.ortho == 0:
            return feats, 0.0
        penalty = sum(_ortho_penalty(self._slices(t, task)) for t in (self.module.p, self.module.k, self.module.a))
        return feats, self.ortho * penalty

    def selected_task(self, learner, x):
        with torch.no_grad():
            alpha = self.weights(learner.model.features(x), None).abs().sum(0)  # (batch, components)
            return alpha.view(alpha.shape[0], -1, self.per_task).sum(2).argmax(1)  # weight mass per task

    def extra_state(self):  # per_task and seed are rebuilt by build() from the run's seed before a restore
        return {"trained": self.trained}

    def load_extra(self, state):
        self.trained = int(state["trained"])


def _ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(2)  # (layers, components, features)
    gram = flat @ flat.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], device=t.device)
    return ((gram - eye) ** 2).sum()


@register_strategy("coda_prompt", test_params={"pool_size": 6, "layers": [0, 1]}, test_model=TINY_VIT)
def coda_prompt(pool_size: int = 100, prompt_length: int = 8, layers: list[int] = [0, 1, 2, 3, 4],  # noqa: B006
                ortho: NonNegative = 0.0, train_mask: bool = True) -> list[Plugin]:
    """CODA-Prompt (Smith et al. 2023): attention-weighted prompt components, orthogonal per task."""
    if prompt_length < 2 or prompt_length % 2:
        raise ConfigError(f"strategy.prompt_length: {prompt_length} must be even (half keys, half values)")
    return [CodaPromptPlugin(pool_size, prompt_length, list(layers), ortho, train_mask)]
