"""Relational Experience Replay (RER).

Wang, Wang, Li, Wei, Wang, Ma, Zheng & Meng, "Relational Experience Replay: Continual Learning by
Adaptively Tuning Task-wise Relationship" (arXiv 2112.15402, 2021/2022). Experience replay whose loss pairs
the i-th new sample with the i-th replayed memory sample and weights the two losses by a small "relation
replay net" V(.; phi). V is learned bi-level, meta-learning style: a virtual SGD step of the model on the
V-weighted loss, then one update of phi that lowers the loss of the virtually-updated model on a fresh
memory batch (the memory plays the role of the meta/validation set).

What this implements (facts from the paper and its official code, github.com/wqza/RelationalExperienceReplay-CL,
models/r_er.py and backbone/MetaResNet18.py:MetaMergeNet; no code copied):

* Replay as ER: a reservoir memory of ``memory_size`` samples; every batch of n new samples is concatenated
  with n memory samples (one forward pass).
* Relation net V: two branches Linear(2, ``hidden``) + ReLU, one fed the pair of detached losses
  (loss_new_i, loss_mem_i), one the pair of logit norms (||f(x_new_i)||, ||f(x_mem_i)||); their sum goes
  through Linear(hidden, 2) and a sigmoid, giving (w_new_i, w_mem_i). hidden = 16 as in the official code.
* Training loss: mean_i w_new_i * loss_new_i + mean_i w_mem_i * loss_mem_i (a sum of two means, as the
  official code). Before the relation net is used (first experience, and the first ``warmup`` fraction of
  each later experience's steps) the weights are fixed to (1, ``replay_weight``) (the code's beta = 1).
* Bi-level step, every ``meta_interval`` steps from the second experience on, before the real update:
  theta' = theta - lr * grad_theta(weighted loss; phi) (differentiable in phi, torch.func.functional_call),
  then phi <- Adam step on CE(f(x_val; theta'), y_val) for a fresh memory batch of n samples.
  Adam lr ``meta_lr`` = 1e-3 with weight decay 1e-4, as in the official code. The weights of the real update
  then come from the updated V, without gradient to phi.

Simplifications vs the official code: (1) the virtual step reuses the replay batch (and the forward pass) of
the real step instead of drawing a second memory batch; (2) the warm-up is a fraction of each experience's
steps rather than "epoch > n_epochs / 2" (which never uses V for a 1-epoch protocol), and the meta update
interval is in steps (the code uses floor(n_epochs / 10) iterations, i.e. 5 for its 50-epoch runs; 1 here);
(3) logit norms under multi-head training are taken over the task's own logits. The paper also applies
the same relation net on top of DER/DER++/ER-ACE; only the ER variant is provided here.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cltoolbox.models.cache import sample_keys
from cltoolbox.params import Interval, Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.replay import ReplayPlugin


class RelationNet(nn.Module):
    """Maps each (new, memory) pair's losses and logit norms to the two loss weights, in (0, 1)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.loss_branch = nn.Linear(2, hidden)
        self.norm_branch = nn.Linear(2, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, losses: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(F.relu(self.loss_branch(losses)) + F.relu(self.norm_branch(norms))))


def _pair_weighted(ce: torch.Tensor, n: int, w: torch.Tensor) -> torch.Tensor:
    return (ce[:n] * w[:, 0]).mean() + (ce[n : 2 * n] * w[:, 1]).mean()


class RERPlugin(ReplayPlugin):
    def __init__(self, memory_size: int, replay_weight: float, meta_lr: float, meta_interval: int, warmup: float,
                 hidden: int) -> None:
        super().__init__(memory_size, "reservoir", None)  # memory batch = new batch size: samples are paired
        self.replay_weight = replay_weight
        self.meta_lr = meta_lr
        self.meta_interval = meta_interval
        self.warmup = warmup
        self.net = RelationNet(hidden)  # initialised from the run's seeded global RNG (built after the model)
        self.meta_opt: torch.optim.Optimizer | None = None
        self._pending_opt_state: dict | None = None
        self.exp_step = 0  # steps done in the current experience
        self.exp_steps = 1  # steps planned for it
        self.meta_updates = 0

    # -- setup / state ------------------------------------------------------------------------------------
    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        self.net.to(learner.device)
        if self.meta_opt is None:
            self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=self.meta_lr, weight_decay=1e-4)
        if self._pending_opt_state is not None:  # resume: load after the net is on its device
            self.meta_opt.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None

    def before_experience(self, learner, exp) -> None:
        self.exp_step = 0
        self.exp_steps = max(1, learner.config.epochs * math.ceil(exp.n_train / learner.config.batch_size))

    def state_dict(self) -> dict:
        return {
            "memory": super().state_dict(),
            "net": self.net.state_dict(),
            "meta_opt": self.meta_opt.state_dict() if self.meta_opt is not None else {},
            "exp_step": self.exp_step, "exp_steps": self.exp_steps, "meta_updates": self.meta_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state["memory"])
        self.net.load_state_dict(state["net"])
        self._pending_opt_state = state["meta_opt"] or None
        if self.meta_opt is not None and self._pending_opt_state is not None:  # already set up: load now
            self.meta_opt.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None
        self.exp_step, self.exp_steps = int(state["exp_step"]), int(state["exp_steps"])
        self.meta_updates = int(state["meta_updates"])

    def memory_usage(self) -> tuple[int, int]:
        items, nbytes = super().memory_usage()
        return items, nbytes + tensor_bytes(*self.net.parameters())

    # -- training -----------------------------------------------------------------------------------------
    def transform_batch(self, learner, batch: Batch) -> Batch:
        self._n_new = len(batch)
        return super().transform_batch(learner, batch)

    def after_step(self, learner, batch: Batch) -> None:
        super().after_step(learner, batch)
        self.exp_step += 1

    def _logit_norms(self, learner, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if learner.multi_head:  # the -1e9 fill of other tasks' outputs would swamp the norm
            logits = logits.masked_fill(~learner.task_mask[t], 0.0)
        return logits.norm(dim=1)

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        n = self._n_new
        if len(batch) == n:  # empty memory: plain cross-entropy on the new batch
            return None
        ce = F.cross_entropy(logits, batch.y, reduction="none")
        relational = learner.experience is not None and learner.experience.index > 0
        if relational:
            norms = self._logit_norms(learner, logits.detach(), batch.t)
            feats = (torch.stack((ce[:n], ce[n:]), 1).detach(), torch.stack((norms[:n], norms[n:]), 1))
            if self.exp_step % self.meta_interval == 0:
                self._meta_update(learner, ce, n, feats)
        if relational and self.exp_step >= self.warmup * self.exp_steps:
            with torch.no_grad():
                w = self.net(*feats)
        else:
            w = ce.new_tensor([1.0, self.replay_weight]).expand(n, 2)
        return _pair_weighted(ce, n, w)

    def _meta_update(self, learner, ce: torch.Tensor, n: int, feats: tuple[torch.Tensor, torch.Tensor]) -> None:
        model = learner.model
        names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad], strict=True)
        # virtual step on the real batch's graph: theta' = theta - lr * d(weighted loss)/d theta, a function of phi
        virtual = _pair_weighted(ce, n, self.net(*feats))
        grads = torch.autograd.grad(virtual, params, create_graph=True, allow_unused=True)
        lr = learner.optimizer.param_groups[0]["lr"]
        fast = {k: p.detach() if g is None else p.detach() - lr * g
                for k, p, g in zip(names, params, grads, strict=True)}
        # buffers are cloned so that the look-ahead forward leaves BatchNorm running statistics untouched
        fast.update({k: b.clone() for k, b in model.named_buffers()})
        kv, yv, tv = self.memory.sample(n, learner.generator)
        with sample_keys(kv, learner.stream):
            out = functional_call(model, fast, (learner.fetch(kv),))
        if learner.multi_head:
            out = out.masked_fill(~learner.task_mask[tv], MASKED_LOGIT)
        meta_loss = F.cross_entropy(out, yv)
        meta_grads = torch.autograd.grad(meta_loss, list(self.net.parameters()))
        for p, g in zip(self.net.parameters(), meta_grads, strict=True):
            p.grad = g
        self.meta_opt.step()
        self.meta_updates += 1


@register_strategy("rer", test_params={"memory_size": 50})
def rer(
    memory_size: PositiveInt = 500,
    replay_weight: NonNegative = 1.0,
    meta_lr: Positive = 1e-3,
    meta_interval: Annotated[int, Min(1, why="steps between relation-net updates")] = 1,
    warmup: Annotated[float, Interval(0, 1, why="a fraction of each experience's steps")] = 0.5,
    hidden: PositiveInt = 16,
) -> list[Plugin]:
    """Relational Experience Replay (Wang et al. 2022): replay with pairwise loss weights learned bi-level."""
    return [RERPlugin(memory_size, replay_weight, meta_lr, meta_interval, warmup, hidden)]
