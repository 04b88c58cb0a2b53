"""Experience Replay (ER).

Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning": every training batch is
concatenated with an equally sized batch drawn uniformly from a small episodic memory, filled by
reservoir sampling. The class-balanced policy refills the memory after each experience with an equal
number of samples per class seen so far (as in GDumb and Avalanche's ClassBalancedBuffer).
"""

from __future__ import annotations

from typing import Literal

from cltoolbox.errors import ConfigError
from cltoolbox.params import PositiveInt
from cltoolbox.plugin import Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.memory import ClassBalancedMemory, MemoryPlugin, ReservoirMemory


class ReplayPlugin(MemoryPlugin):
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)
    supports_multi_label = True  # the reservoir keeps each image with the labels it had when stored
    def __init__(self, memory_size: int, policy: str, mem_batch_size: int | None) -> None:
        self.policy = policy
        self.mem_batch_size = mem_batch_size
        self.memory = ReservoirMemory(memory_size) if policy == "reservoir" else ClassBalancedMemory(memory_size)

    def check(self, model, stream) -> None:
        # multi-label streams: the reservoir keeps each sample with its labels as annotated when it was seen
        # (its experience's classes only); per-class quotas are not defined for multi-hot labels
        if stream.multi_label and self.policy != "reservoir":
            raise ConfigError("strategy.policy: class_balanced needs one label per sample; use reservoir on a "
                              "multi-label stream")

    def transform_batch(self, learner, batch: Batch) -> Batch:
        self._current = batch  # the stream part: only it enters the reservoir
        if self.memory.size == 0:
            return batch
        n = self.mem_batch_size or len(batch)
        key, y, t = self.memory.sample(n, learner.generator)
        return batch.cat(learner.fetch(key), y, t, key)

    def after_step(self, learner, batch: Batch) -> None:
        if self.policy == "reservoir":
            cur = self._current
            self.memory.add(cur.key, cur.y, cur.t, learner.generator)

    def after_experience(self, learner, exp) -> None:
        if self.policy == "class_balanced":
            import torch

            t = torch.full_like(exp.y_train, exp.task_id)
            self.memory.update(learner.stream.keys(exp.train), exp.y_train, t, learner.generator)


@register_strategy("er", test_params={"memory_size": 50})
def er(
    memory_size: PositiveInt = 500,
    policy: Literal["reservoir", "class_balanced"] = "reservoir",
    mem_batch_size: PositiveInt | None = None,
) -> list[Plugin]:
    """Experience Replay (Chaudhry et al. 2019): replay a memory batch with every training batch."""
    return [ReplayPlugin(memory_size, policy, mem_batch_size)]
