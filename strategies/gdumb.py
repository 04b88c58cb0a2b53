"""GDumb: Greedy sampler and Dumb learner.

Prabhu, Torr and Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning" (ECCV). The sampler stores a stream sample while the memory has room; once it is full, a sample
is stored only if its class holds fewer than memory_size / (classes seen so far) samples, and then it
replaces a random sample of the currently largest class. The learner ignores the stream otherwise: at
each experience the model is re-initialised and trained from scratch on the memory alone.

Defaults: ``memory_size = 500`` (this toolbox's replay budget for Split-MNIST, as ER's; the paper compares
at the memory size of each baseline's own setup, the continual-learning-baselines config uses 4400);
``epochs = 10`` as in the ContinualAI continual-learning-baselines GDumb Split-MNIST config
(``experiments/split_mnist/gdumb.py``: 10 epochs, SGD lr 0.1, batch 16). The authors' code trains longer,
with SGD and cosine warm restarts; here the optimiser, lr and batch size come from ``train.*``. Logits are
not masked at inference (the authors' code masks only for task-IL accuracy, which the evaluator does).

The greedy sampler is the paper's: it never replaces a sample of a class that is at its quota. On streams
whose experiences repeat the same classes (permuted, rotated) the memory therefore fills during the first
experience and keeps only it (measured: Permuted-MNIST-5k ACC 0.27 vs Avalanche's GDumb 0.75, whose
buffer differs from the paper here); GDumb is meant for class-incremental streams.
"""

from __future__ import annotations

import torch

from cltoolbox.models.cache import SampleFeatureCache
from cltoolbox.params import PositiveInt
from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.memory import Memory, MemoryPlugin


class GreedyClassBalancedMemory(Memory):
    """GDumb's greedy class-balancing sampler over preallocated tensors (``size`` valid rows)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.seen: list[int] = []  # classes seen so far, in order of arrival

    def add(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        """Offer the samples ``key`` (stream keys) to the sampler one after another, in the given order.

        The decisions depend only on labels, so they are made on Python ints (no tensor op per sample);
        the entries are then moved with one scatter.
        """
        self._allocate(key, y)
        labels = y.tolist()
        draws = torch.rand(len(labels), generator=generator).tolist()  # one per sample: the eviction choice
        slot_label = self.y[: self.size].tolist()
        slots: dict[int, list[int]] = {}  # class -> the memory slots it occupies
        for s, c in enumerate(slot_label):
            slots.setdefault(c, []).append(s)
        seen = set(self.seen)
        size = self.size
        src = torch.full((self.capacity,), -1, dtype=torch.long)  # slot -> index in key that now fills it
        for i, c in enumerate(labels):
            if c not in seen:
                seen.add(c)
                self.seen.append(c)
            own = slots.setdefault(c, [])
            if size < self.capacity:
                slot, size = size, size + 1
            elif len(own) < self.capacity / len(self.seen):
                largest = max(slots, key=lambda k: (len(slots[k]), -k))  # ties: the smallest class id
                victims = slots[largest]
                j = int(draws[i] * len(victims))
                slot = victims[j]
                victims[j] = victims[-1]  # O(1) removal; order is deterministic given the draws
                victims.pop()
            else:
                continue
            own.append(slot)
            src[slot] = i
        filled = torch.nonzero(src >= 0).flatten()
        idx = src[filled].to(key.device)
        filled = filled.to(self.key.device)
        self.key[filled], self.y[filled], self.t[filled] = key[idx], y[idx], t[idx]
        self.size = size

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, y, t) of the stored entries."""
        return self.key[: self.size], self.y[: self.size], self.t[: self.size]

    def _extra_state(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = [int(c) for c in state["seen"]]


def reinitialise(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Draw fresh initial weights (each module's own ``reset_parameters``) from ``seed``, leaving the
    global RNG streams as they were."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(getattr(m, "cache", None), SampleFeatureCache):
                m.cache.clear()  # new weights, new features (a frozen backbone's cache)


class GDumbPlugin(MemoryPlugin):
    supports_ddp = True  # memory from the whole experience, same draws on every rank; train_data shards
    def __init__(self, memory_size: int, epochs: int) -> None:
        self.memory = GreedyClassBalancedMemory(memory_size)
        self.epochs = epochs

    def train_experience(self, learner, exp) -> bool:
        # the stream order inside an experience is arbitrary: offer the samples in a seeded random order
        order = torch.randperm(exp.n_train, generator=learner.generator).to(exp.y_train.device)
        t = torch.full_like(exp.y_train, exp.task_id)
        keys = learner.stream.keys(exp.train)
        self.memory.add(keys[order], exp.y_train[order], t[order], learner.generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=learner.generator))
        reinitialise(learner.model, seed, learner.device)
        learner.train_data(*self.memory.tensors(), epochs=self.epochs)
        return True


@register_strategy("gdumb", test_params={"memory_size": 60, "epochs": 2})
def gdumb(memory_size: PositiveInt = 500, epochs: PositiveInt = 10) -> list[Plugin]:
    """GDumb (Prabhu et al. 2020): greedy class-balanced memory; retrain from scratch on it each experience.

    ``epochs`` (over the memory, per experience) replaces train.epochs; 10 as in the continual-learning-
    baselines Split-MNIST GDumb config.
    """
    return [GDumbPlugin(memory_size, epochs)]
