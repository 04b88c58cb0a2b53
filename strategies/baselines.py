"""Reference points every CL paper reports: fine-tuning (lower bound) and joint / cumulative training."""

from __future__ import annotations

import torch

from cltoolbox.plugin import Plugin, tensor_bytes
from cltoolbox.registry import register_strategy


@register_strategy("naive")
def naive() -> list[Plugin]:
    """Fine-tune on each experience in turn with no protection against forgetting (the lower bound)."""
    return []


class JointTraining(Plugin):
    """Trains once on the union of all experiences, at the first experience; later ones train nothing.

    The model then sees future data, so its FWT is not a transfer measure; its final accuracy is the
    offline upper bound, and it cannot forget (the weights never change after the first row).
    """
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)

    def __init__(self) -> None:
        self.stored = (0, 0)  # (items, bytes): joint training holds the whole stream's training data

    def train_experience(self, learner, exp) -> bool:
        if exp.index == 0:
            s = learner.stream
            keys = torch.cat([s.keys(e.train) for e in s])
            y = torch.cat([e.y_train for e in s])
            t = torch.cat([torch.full_like(e.y_train, e.task_id) for e in s])
            self.stored = (len(y), len(y) * s.sample_bytes() + tensor_bytes(y, t))
            learner.train_data(keys, y, t)
        return True

    def state_dict(self) -> dict:
        return {"stored": list(self.stored)}

    def load_state_dict(self, state: dict) -> None:
        self.stored = tuple(int(v) for v in state["stored"])

    def memory_usage(self) -> tuple[int, int]:
        return self.stored


@register_strategy("joint")
def joint() -> list[Plugin]:
    """Offline upper bound: train on all experiences at once (i.i.d. over the whole stream)."""
    return [JointTraining()]


class CumulativeTraining(Plugin):
    """At experience i, trains (continuing from the current weights) on the union of experiences 1..i."""
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)

    def __init__(self) -> None:
        self.key: list[torch.Tensor] = []  # stream keys of the samples seen so far
        self.y: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []
        self.item_bytes = 0

    def train_experience(self, learner, exp) -> bool:
        self.item_bytes = learner.stream.sample_bytes()
        self.key.append(learner.stream.keys(exp.train))
        self.y.append(exp.y_train)
        self.t.append(torch.full_like(exp.y_train, exp.task_id))
        learner.train_data(torch.cat(self.key), torch.cat(self.y), torch.cat(self.t))
        return True

    def state_dict(self) -> dict:
        return {"key": list(self.key), "y": list(self.y), "t": list(self.t), "item_bytes": self.item_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.key, self.y, self.t = list(state["key"]), list(state["y"]), list(state["t"])
        self.item_bytes = int(state["item_bytes"])

    def memory_usage(self) -> tuple[int, int]:
        n = sum(len(y) for y in self.y)
        return n, n * self.item_bytes + tensor_bytes(*self.y, *self.t)


@register_strategy("cumulative")
def cumulative() -> list[Plugin]:
    """Retrain on all data seen so far at every experience (an upper bound that respects the order)."""
    return [CumulativeTraining()]
