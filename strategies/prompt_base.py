"""The machinery the prompt strategies (l2p, dualprompt, coda_prompt in prompting.py) share: a frozen ViT, a
plugin-owned prompt module whose entries outside the current task's allotment are put back after every step,
the query and masks, the selection diagnostic and the checkpoint (see prompting.py's docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import sample_keys
from cltoolbox.models.vit import ViTClassifier
from cltoolbox.plugin import MASKED_LOGIT, Plugin
from cltoolbox.strategies.extractor import class_mask

# the small ViT that `cltoolbox.testing` checks the prompt strategies with
TINY_VIT = {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
INIT_SEED = 7919  # prompt initialisation draws from its own generator: data order stays the stream's


def uniform_init(gen: torch.Generator, *shape: int) -> nn.Parameter:
    """A prompt tensor drawn from U(-1, 1) with ``gen``."""
    return nn.Parameter(torch.rand(*shape, generator=gen) * 2 - 1)  # U(-1, 1), the authors' prompt init


class PromptPlugin(Plugin):
    """Shared machinery: frozen ViT, plugin-owned prompt module, query, masks, checkpointing."""

    method = "prompting"

    def __init__(self, pull: float, train_mask: bool) -> None:
        self.pull = pull
        self.train_mask = train_mask
        self.module: nn.Module | None = None
        self.seen: torch.Tensor | None = None  # classes trained so far
        self.current: torch.Tensor | None = None  # classes of the current experience
        self._pending: dict | None = None
        self._aux: torch.Tensor | float = 0.0
        self._snapshot: dict[str, torch.Tensor] = {}  # the prompt tensors at the start of the experience
        self._head: list[torch.Tensor] = []  # the head's weight and bias at the start of the experience

    # -- subclass API ----------------------------------------------------------------------------------
    def check(self, model, stream) -> None:
        if not isinstance(model, ViTClassifier):
            raise ConfigError(f"strategy: {self.method} prompts a Vision Transformer; set model.name: vit")

    def build(self, model: ViTClassifier, n_tasks: int, gen: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def prompted(self, model: ViTClassifier, x: torch.Tensor, task: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Pre-head features of ``x`` with prompts (``task`` while training, None at inference) and the
        auxiliary loss."""
        raise NotImplementedError

    def selected_task(self, learner, x: torch.Tensor) -> torch.Tensor:
        """The task whose prompts each input selects at inference."""
        raise NotImplementedError

    # -- hooks -------------------------------------------------------------------------------------------
    def before_fit(self, learner, stream) -> None:
        model = learner.model
        self.check(model, stream)
        model.set_frozen(True)  # the backbone; the head stays trainable
        if self.module is None:
            gen = torch.Generator().manual_seed(learner.seed * 1_000_003 + INIT_SEED)
            self.module = self.build(model, len(stream), gen).to(learner.device)
            self.seen = torch.zeros(stream.n_classes, dtype=torch.bool, device=learner.device)
            if self._pending is not None:
                self._restore(self._pending)

    def before_experience(self, learner, exp) -> None:
        self.current = class_mask(self.seen.shape[0], exp.classes, self.seen.device)
        self.prepare(learner, exp)
        self._snapshot = {k: v.detach().clone() for k, v in self.module.named_parameters()}
        if self.train_mask:  # the head's rows of the other classes: masked out of the loss, so frozen too
            self._head = [p.detach().clone() for p in learner.model.head.parameters()]

    def prepare(self, learner, exp) -> None:
        """Per-experience set-up of the prompt tensors before the frozen entries are recorded (CODA-Prompt
        initialises the task's components here)."""

    def frozen(self, name: str, tensor: torch.Tensor, task: int) -> torch.Tensor | None:
        """Bool mask, broadcastable to ``tensor`` (the module parameter ``name``), of the entries outside
        ``task``'s allotment; None: the whole tensor is the task's."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, learner, batch) -> None:
        """Put back every entry outside the current task's allotment, bit for bit: whatever weight decay (or
        optimizer state built from it) did to them in this step is undone. An L2P pool entry joins the
        allotment at the first step a batch of the task selects it, from its value at the task's start."""
        task = learner.experience.index
        for name, t in self.module.named_parameters():
            mask = self.frozen(name, t, task)
            if mask is not None:
                t.copy_(torch.where(mask, self._snapshot[name], t))
        if self.train_mask:
            other = ~self.current
            for p, before in zip(learner.model.head.parameters(), self._head, strict=True):
                p.copy_(torch.where(other.view(-1, *[1] * (p.dim() - 1)), before, p))

    def forward(self, learner, x, t):
        feats, self._aux = self.prompted(learner.model, x, learner.experience.index)
        logits = learner.model.head(feats)
        if self.train_mask:
            logits = logits.masked_fill(~self.current, MASKED_LOGIT)
        return logits

    def loss(self, learner, batch, logits):
        aux, self._aux = self._aux, 0.0
        return aux

    def after_experience(self, learner, exp) -> None:
        self.seen |= self.current

    def predict(self, learner, x, task_ids):
        if self.module is None or not bool(self.seen.any()):
            return None
        feats, _ = self.prompted(learner.model, x, None)
        return learner.model.head(feats).float().masked_fill(~self.seen, MASKED_LOGIT)

    def parameters(self) -> list[torch.Tensor]:
        return [] if self.module is None else list(self.module.parameters())

    @torch.no_grad()
    def report(self, learner, stream) -> dict[str, float]:
        """``selection_acc``: how often a test sample selects its own task's prompts (streams whose test
        experiences are the training experiences, one task each)."""
        tests = stream.eval_experiences
        if self.module is None or len(tests) != len(stream) or stream.first_seen() != list(range(1, len(stream) + 1)):
            return {}
        was_training = learner.model.training
        learner.model.eval()
        right = 0
        for i, e in enumerate(tests):  # test sets walked in eval batches; the queries come from the feature cache
            for keys, x in learner.batches(stream.keys(e.test)):
                with sample_keys(keys, stream):
                    right += int((self.selected_task(learner, x) == i).sum())
        learner.model.train(was_training)
        return {"selection_acc": right / max(1, sum(e.n_test for e in tests))}

    def cost(self) -> dict[str, float]:
        return {"prompt_params": sum(p.numel() for p in self.parameters())}

    # -- checkpoint --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.module is None:
            return {} if self._pending is None else self._pending
        return {"module": self.module.state_dict(), "seen": self.seen.cpu(), **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending = state  # applied once before_fit has built the module for this model
            if self.module is not None:
                self._restore(state)

    def _restore(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.seen.copy_(state["seen"])
        self.load_extra(state)
        self._pending = None

    @staticmethod
    def check_blocks(name: str, layers: list[int], model: ViTClassifier) -> None:
        bad = [i for i in layers if not 0 <= i < model.depth]
        if bad:
            raise ConfigError(f"strategy.{name}: block {bad[0]} does not exist in a ViT of depth {model.depth}; "
                              f"use blocks 0..{model.depth - 1}")

    def extra_state(self) -> dict:
        return {}

    def load_extra(self, state: dict) -> None: ...


def key_cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query (row of ``q``) with every key: (queries, keys)."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a long tensor ``idx`` of any shape, reproducible in its gradient.

    Selected prompts repeat across a batch. The backward of ``table[idx]`` adds the repeated rows' gradients
    with parallel atomic adds on CPU (large tensors, several threads), in a different order every call, so
    runs with the same seed differed at the last bit; ``index_select``'s backward adds them in index order.
    """
    return table.index_select(0, idx.flatten()).view(*idx.shape, *table.shape[1:])
