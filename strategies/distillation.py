"""Learning without Forgetting (LwF): knowledge distillation from the model of the previous experience.

Li & Hoiem 2016 (ECCV; TPAMI 2017), "Learning without Forgetting": before training on new data, record
the old network's responses for the old tasks; while training, add lambda_o * L_old, a distillation loss
between the recorded (old) and the current (new) outputs of the old tasks, with temperature T = 2.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.params import Min, NonNegative
from cltoolbox.plugin import Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy


class _OutputTap:
    """A forward hook on the trained model that keeps its last training-time (unmasked) output.

    The loop's ``logits`` are masked to each sample's task (-1e9 elsewhere) in task-IL, so the old
    classes' outputs of the current model are read here instead, without a second forward pass (which
    would also update BatchNorm statistics twice). A plain object, not a bound method of the plugin, so a
    ``deepcopy`` of the model never copies the plugin.
    """

    def __init__(self) -> None:
        self.target: nn.Module | None = None
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if module is self.target and torch.is_grad_enabled() and module.training:
            self.x, self.out = inputs[0], output

    def __deepcopy__(self, memo: dict) -> _OutputTap:
        # a deep copy of the model (the frozen old model, or another plugin's copy) gets an inert tap and
        # never tries to copy the captured non-leaf output
        return _OutputTap()


class LwFPlugin(Plugin):
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)
    def __init__(self, alpha: float | list[float], temperature: float) -> None:
        self.alpha = alpha
        self.temperature = temperature
        self.old_state: dict[str, torch.Tensor] | None = None  # weights of the model after the last experience
        self.old_tasks: dict[int, list[int]] = {}  # task id -> classes seen for it before this experience
        self._old: nn.Module | None = None
        self._tap = _OutputTap()
        self._handle = None

    # -- hooks ------------------------------------------------------------------------------------------
    def before_fit(self, learner, stream) -> None:
        if self._handle is not None:  # resume calls before_fit again
            self._handle.remove()
        self._tap.target = learner.model
        self._handle = learner.model.register_forward_hook(self._tap)

    def after_fit(self, learner, stream) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._tap.x = self._tap.out = None

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        alpha = self.alpha_at(learner.experience.index if learner.experience is not None else 0)
        if self.old_state is None or alpha == 0:
            return 0.0
        tap = self._tap
        x = learner.model_input(batch.x)  # the augmented batch when train.augment_* are on
        new = tap.out if tap.x is x and tap.out is not None else learner.model(x)
        with torch.no_grad():
            old = self._old_model(learner)(x)
        # task-IL: one softmax per old task head (as the paper's per-task output layers); otherwise one
        # over every class seen before. Only those columns enter, never the -1e9 task mask.
        groups = self.old_tasks.values() if learner.multi_head else [sorted({c for cs in self.old_tasks.values()
                                                                            for c in cs})]
        total = 0.0
        for classes in groups:
            idx = torch.as_tensor(classes, device=new.device)
            total = total + distillation_loss(new[:, idx], old[:, idx], self.temperature)
        return alpha * total

    def alpha_at(self, experience: int) -> float:
        """The distillation weight of an experience: a schedule (one per experience, the last one repeats)
        or a constant."""
        if isinstance(self.alpha, list):
            return float(self.alpha[min(experience, len(self.alpha) - 1)])
        return float(self.alpha)

    def after_experience(self, learner, exp) -> None:
        self.old_state = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
        seen = self.old_tasks.setdefault(int(exp.task_id), [])
        self.old_tasks[int(exp.task_id)] = sorted(set(seen) | {int(c) for c in exp.classes})
        self._old = None  # rebuilt lazily from old_state

    # -- state --------------------------------------------------------------------------------------------
    def _old_model(self, learner) -> nn.Module:
        if self._old is None:
            old = copy.deepcopy(learner.model)
            old.load_state_dict(self.old_state)
            old.eval().requires_grad_(False)
            self._old = old
            self.old_state = old.state_dict()  # share the module's tensors: one copy in memory
        return self._old

    def state_dict(self) -> dict[str, Any]:
        return {"old_state": self.old_state,
                "old_tasks": {str(k): list(v) for k, v in self.old_tasks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_state = state["old_state"]
        self.old_tasks = {int(k): [int(c) for c in v] for k, v in state["old_tasks"].items()}
        self._old = None

    def memory_usage(self) -> tuple[int, int]:
        """(0, bytes of the frozen old model): no data samples are stored."""
        if self.old_state is None:
            return 0, 0
        return 0, tensor_bytes(*self.old_state.values())


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(old/T) || softmax(new/T)), mean over the batch.

    Equal to the paper's cross-entropy with the old network's softened outputs as targets minus their
    entropy, a constant: the same gradient, but 0 when the outputs agree.
    """
    log_new = F.log_softmax(new_logits / temperature, dim=1)
    log_old = F.log_softmax(old_logits / temperature, dim=1)
    return F.kl_div(log_new, log_old, log_target=True, reduction="batchmean")


@register_strategy("lwf")
def lwf(alpha: NonNegative | list[NonNegative] = 1.0,
        temperature: Annotated[float, Min(0, strict=True)] = 2.0) -> list[Plugin]:
    """Learning without Forgetting (Li & Hoiem 2016): distil the previous experience's model on new data.

    A frozen copy of the model from the end of the previous experience (eval mode) gives soft targets on
    every training batch (replayed samples included when composed with er: `strategy: {name: er,
    plugins: [{name: lwf}]}`); the loss adds alpha * KL between the old and new temperature-softened
    outputs over the classes seen before this experience (per old task head in task-IL).

    Defaults: temperature=2 (the paper's T); alpha=1 (the paper's loss balance lambda_o = 1, also
    Avalanche's Split-MNIST LwF baseline). No T^2 rescaling, as in the paper. ``alpha`` may also be a
    list, one weight per experience (the last one repeats), as in continual-learning-baselines' Split-MNIST
    LwF ([0, 0.5, 1.33, 2.25, 3.2]).
    """
    if isinstance(alpha, list) and not alpha:
        raise ConfigError(f"strategy.alpha: a schedule needs one or more values >= 0, got {alpha}")
    return [LwFPlugin(alpha, temperature)]
