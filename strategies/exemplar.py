"""What the exemplar class-IL strategies (WA, BiC, LUCIR) share: exemplar memory, teacher, training set.

These methods (unlike ER, which mixes a replay batch into every step) train each experience on its own data
together with a small class-balanced exemplar memory, then distil from the model frozen at the end of the
previous experience. :class:`ExemplarPlugin` does that bookkeeping once:

* the memory holds stream keys, equal slots per class seen, refilled after every experience: a uniform random
  sample of each class (``selection: random``, :class:`ClassBalancedMemory`) or iCaRL's herding order in the
  model's L2-normalised feature space (``selection: herding``, :class:`HerdingMemory`, what the three papers
  use), reduced by truncating that order when classes arrive;
* ``train_experience`` runs the standard epoch loop over the experience's keys plus the memory's;
* the teacher is rebuilt lazily from ``old_state`` (the weights at the end of the previous experience),
  in eval mode and without gradients, so checkpoints hold plain tensors;
* ``old_classes`` (seen before, not in the current experience) and ``current_classes`` drive the
  distillation and the corrections of the subclasses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.strategies.memory import ClassBalancedMemory


class HerdingMemory(ClassBalancedMemory):
    """Equal slots per class, each class's exemplars in iCaRL's herding order (Rebuffi et al. 2017, Alg. 4).

    Stored like :class:`ClassBalancedMemory` (keys, labels, task ids), with ``priority`` = minus the herding rank,
    so "each class keeps its highest-priority entries" means "truncate the herding order" here as well.
    """

    def update_herding(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                       features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add the samples (key, y, t): classes among them are herded afresh over those samples plus their
        current exemplars; other classes keep the head of their order. ``features(keys)``: L2-normalised
        features of stream samples."""
        from cltoolbox.strategies.icarl import herding

        self._allocate(key, y)
        if self.priority is None:
            self.priority = torch.zeros(self.capacity)
        n = self.size
        all_key, all_y, all_t = torch.cat((self.key[:n], key)), torch.cat((self.y[:n], y)), torch.cat((self.t[:n], t))
        all_p = torch.cat((self.priority[:n], torch.full((y.shape[0],), float("-inf"))))
        labels = all_y.cpu()
        fresh = set(y.cpu().unique().tolist())
        classes = torch.unique(labels)
        quota, extra = divmod(self.capacity, len(classes))
        keep, prio = [], []
        for rank, c in enumerate(classes.tolist()):
            idx = torch.nonzero(labels == c).flatten()
            k = min(len(idx), quota + (1 if rank < extra else 0))
            if c in fresh:
                order = idx[herding(features(all_key[idx.to(all_key.device)]), k).cpu()]
                keep.append(order)
                prio.append(-torch.arange(len(order), dtype=torch.float))
            else:
                top = torch.topk(all_p[idx], k).indices
                keep.append(idx[top])
                prio.append(all_p[idx[top]])
        keep = torch.cat(keep)
        dev = keep.to(self.key.device)
        self.size = len(keep)
        self.key[: self.size], self.y[: self.size], self.t[: self.size] = all_key[dev], all_y[dev], all_t[dev]
        self.priority[: self.size] = torch.cat(prio)


class ExemplarPlugin(Plugin):
    """Base of the exemplar strategies; subclasses add the loss and what happens after an experience."""

    name = "exemplar"

    def __init__(self, memory_size: int, selection: str = "herding") -> None:
        self.selection = selection
        self.memory = HerdingMemory(memory_size) if selection == "herding" else ClassBalancedMemory(memory_size)
        self.seen: list[int] = []  # classes trained in earlier experiences, in order of arrival
        self.old_state: dict[str, torch.Tensor] | None = None
        self.old_classes: torch.Tensor | None = None  # seen before and absent from the current experience
        self.current_classes: torch.Tensor | None = None
        self._teacher: nn.Module | None = None

    def check(self, model: nn.Module, stream) -> None:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or not callable(getattr(model, "features", None)):
            raise ConfigError(f"strategy: {self.name} needs a model with a linear `head` over all classes and a "
                              "`features(x)` method; use model mlp, resnet18_reduced, vit or efficientnet_lite0")

    def before_fit(self, learner, stream) -> None:
        self.memory.item_bytes = stream.sample_bytes()

    def before_experience(self, learner, exp) -> None:
        current = exp.y_train.unique().tolist()
        old = [c for c in self.seen if c not in set(current)]
        dev = learner.device
        self.current_classes = torch.tensor(current, dtype=torch.long, device=dev)
        self.old_classes = torch.tensor(old, dtype=torch.long, device=dev) if old else None
        self._teacher = None

    def seen_mask(self, n_classes: int, device) -> torch.Tensor:
        """Bool over ``n_classes``: the current experience's classes and the old ones (after before_experience)."""
        seen = torch.zeros(n_classes, dtype=torch.bool, device=device)
        seen[self.current_classes] = True
        if self.old_classes is not None:
            seen[self.old_classes] = True
        return seen

    def kd_weight(self) -> float:
        """lambda = n_old / (n_old + n_current) classes (Wu et al. 2019, Eq. 3; used by WA too)."""
        if self.old_classes is None:
            return 0.0
        n_old = len(self.old_classes)
        return n_old / (n_old + len(self.current_classes))

    # -- training set ---------------------------------------------------------------------------------
    def training_set(self, learner, exp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, labels, task ids) of the experience plus every exemplar."""
        key, y = learner.stream.keys(exp.train), exp.y_train
        t = torch.full_like(y, exp.task_id)
        m = self.memory
        if m.size:
            dev = key.device
            key = torch.cat((key, m.key[: m.size].to(dev)))
            y, t = torch.cat((y, m.y[: m.size].to(dev))), torch.cat((t, m.t[: m.size].to(dev)))
        return key, y, t

    def train_experience(self, learner, exp) -> bool:
        learner.train_data(*self.training_set(learner, exp))
        return True

    def after_experience(self, learner, exp) -> None:
        """Refill the memory with this experience's data and freeze the model as the next teacher (subclasses
        apply their corrections first)."""
        t = torch.full_like(exp.y_train, exp.task_id)
        if self.selection == "herding":
            self.memory.update_herding(learner.stream.keys(exp.train), exp.y_train, t,
                                       lambda keys: self.herding_features(learner, keys))
        else:
            self.memory.update(learner.stream.keys(exp.train), exp.y_train, t, learner.generator)
        for c in exp.y_train.unique().tolist():
            if c not in self.seen:
                self.seen.append(c)
        self.old_state = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
        self._teacher = None

    def herding_features(self, learner, keys: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of stream samples for herding (the model's ``features``; expansion methods
        herd in their concatenated feature space)."""
        from cltoolbox.strategies.icarl import normalised_stream_features

        return normalised_stream_features(learner, keys)

    # -- teacher --------------------------------------------------------------------------------------
    def teacher(self, learner) -> nn.Module:
        if self._teacher is None:
            model = copy.deepcopy(learner.model)
            model.load_state_dict(self.old_state)
            self._teacher = model.eval().requires_grad_(False)
        return self._teacher

    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the teacher outputs for ``x`` (subclasses add their output corrections)."""
        return self._teacher(x)

    def teacher_logits(self, learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of ``x`` (masked to each sample's task on multi-head streams, as the student's)."""
        self.teacher(learner)
        with torch.no_grad():
            out = self.teacher_output(x)
            if learner.multi_head:
                out = out.masked_fill(~learner.task_mask[t], MASKED_LOGIT)
        return out

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "seen": list(self.seen), "old_state": self.old_state}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.seen = [int(c) for c in state["seen"]]
        self.old_state = state["old_state"]
        self._teacher = None

    def memory_usage(self) -> tuple[int, int]:
        """Exemplars at their native size plus the frozen teacher's weights."""
        items, nbytes = self.memory.usage()
        return items, nbytes + (tensor_bytes(*self.old_state.values()) if self.old_state else 0)
