"""Dark Experience Replay (DER) and DER++.

Buzzega et al. 2020, "Dark Experience for General Continual Learning: a Strong, Simple Baseline" (NeurIPS).
A reservoir memory keeps stream samples together with the logits the network gave them when they were
seen (the logits of the training forward pass, before that step's update). Every step adds

    DER:   alpha * MSE(f(x_m), z_m)                       on a memory batch (x_m, z_m)
    DER++: alpha * MSE(f(x_m), z_m) + beta * CE(f(x_m'), y_m')   with an independently drawn (x_m', y_m')

to the cross-entropy on the stream batch.

Defaults: the paper's best hyperparameters for Seq-MNIST with a 500-sample buffer (Appendix, hyperparameter
table; the same values are released as ``best_args['seq-mnist']`` in the authors' code, aimagelab/mammoth
``utils/best_args.py``): DER alpha = 1.0; DER++ alpha = 1.0, beta = 0.5. (alpha = 0.2 and, for DER++,
beta = 1.0 are their values for a 200-sample buffer; alpha = 0.3 is DER's on Seq-CIFAR-10.) The memory
batch defaults to the stream batch size, as in this toolbox's ER; the paper used 128 for DER and 10 for
DER++ on Seq-MNIST-500.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltoolbox import distributed
from cltoolbox.params import NonNegative, PositiveInt
from cltoolbox.plugin import Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.memory import MemoryPlugin, ReservoirMemory


class WithLogits:
    """Memory mixin: each entry carries a row of logits (sampled with it, counted in its bytes, saved in its
    state); put it before the memory class it extends (DER's reservoir, X-DER's class-balanced memory)."""

    logits: torch.Tensor | None = None

    def sample_with_logits(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(keys, y, t, logits) of ``n`` entries drawn uniformly with replacement (one randint + gathers);
        inputs: ``learner.fetch(keys)``."""
        idx = torch.randint(self.size, (n,), generator=generator).to(self.key.device)
        return (self.key.index_select(0, idx), self.y.index_select(0, idx), self.t.index_select(0, idx),
                self.logits.index_select(0, idx.to(self.logits.device)))

    def usage(self) -> tuple[int, int]:
        items, nbytes = super().usage()
        return items, nbytes + (0 if self.logits is None else tensor_bytes(self.logits[:1]) * items)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "logits": self.logits}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.logits = state["logits"]


class LogitMemory(WithLogits, ReservoirMemory):
    """A reservoir memory of (key, y, t) entries with the logits each sample got when it was stored.

    The logits go to the slots the reservoir chose for their samples (``ReservoirMemory.add`` returns them), so
    they stay aligned without a second copy of its sampling logic.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.logits: torch.Tensor | None = None

    def add_with_logits(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor,
                        generator: torch.Generator) -> None:
        rows, slots = self.add(key, y, t, generator)
        if self.logits is None:
            self.logits = logits.new_zeros((self.capacity, logits.shape[1]))
        self.logits[slots.to(self.logits.device)] = logits[rows.to(logits.device)]

class DERPlugin(MemoryPlugin):
    """Logit (and, with beta > 0, label) replay from a reservoir memory; see the module docstring."""

    # DDP: the reservoir takes the global batch with its logits gathered from the ranks, memory draws are sized by
    # the global batch, and the memory terms are computed alike on every rank
    supports_ddp = True

    def __init__(self, memory_size: int, alpha: float, beta: float, mem_batch_size: int | None) -> None:
        self.alpha, self.beta, self.mem_batch_size = alpha, beta, mem_batch_size
        self.memory = LogitMemory(memory_size)
        self._batch: Batch | None = None
        self._logits: torch.Tensor | None = None

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        # what the reservoir stores after this step: the batch and its logits before the update (several
        # processes: the global batch, its logits gathered from every rank's shard)
        batch = learner.global_batch if learner.global_batch is not None else batch
        self._batch, self._logits = batch, distributed.gather_rows(logits.detach(), len(batch))
        mem = self.memory
        if mem.size == 0:
            return 0.0
        n = self.mem_batch_size or len(batch)
        key, _, t, z = mem.sample_with_logits(n, learner.generator)
        extra = self.alpha * F.mse_loss(learner.forward(learner.fetch(key), t, key), z)
        if self.beta > 0:
            key2, y2, t2, _ = mem.sample_with_logits(n, learner.generator)  # independent of the first draw
            extra = extra + self.beta * F.cross_entropy(learner.forward(learner.fetch(key2), t2, key2), y2)
        return extra

    def after_step(self, learner, batch: Batch) -> None:
        b = self._batch
        self.memory.add_with_logits(b.key, b.y, b.t, self._logits, learner.generator)
        self._batch = self._logits = None


@register_strategy("der", test_params={"memory_size": 50})
def der(memory_size: PositiveInt = 500, alpha: NonNegative = 1.0, mem_batch_size: PositiveInt | None = None
        ) -> list[Plugin]:
    """Dark Experience Replay (Buzzega et al. 2020): match stored logits of reservoir samples (MSE).

    Defaults: Seq-MNIST, buffer 500 in the paper's hyperparameter table (alpha = 1.0).
    """
    return [DERPlugin(memory_size, alpha, 0.0, mem_batch_size)]


@register_strategy("derpp", test_params={"memory_size": 50})
def derpp(memory_size: PositiveInt = 500, alpha: NonNegative = 1.0, beta: NonNegative = 0.5,
          mem_batch_size: PositiveInt | None = None) -> list[Plugin]:
    """DER++ (Buzzega et al. 2020): DER's logit matching plus CE on a second memory batch.

    Defaults: Seq-MNIST, buffer 500 in the paper's hyperparameter table (alpha = 1.0, beta = 0.5).
    """
    return [DERPlugin(memory_size, alpha, beta, mem_batch_size)]
