"""ER-ACE: Experience Replay with the asymmetric cross-entropy.

Caccia, Aljundi, Asadi, Tuytelaars, Pineau and Belilovsky 2022, "New Insights on Reducing Abrupt
Representation Change in Online Continual Learning" (ICLR). When new classes arrive, plain ER's cross-entropy
on the incoming batch pushes the (well-trained) old classes' logits down with large gradients and drags the
old classes' features towards the new ones. ER-ACE makes the two halves of each step asymmetric:

    L = CE(f(x_in) restricted to the classes present in the incoming batch, y_in)
      + CE(f(x_mem), y_mem) over all classes seen so far

so the incoming samples never act as negatives for classes they do not hold; old classes are contrasted
with new ones only through replayed samples. The memory is a reservoir of stream keys, as in ER (see
``strategies/replay.py``), and a memory batch as large as the incoming one is drawn at every step.

Defaults: memory 500 and a memory batch equal to the stream batch (the paper's online protocol: batch 10,
replay batch 10). The two terms are summed as in the paper's objective (plain ER averages the concatenated
batch instead). "Seen so far" covers every label that has arrived in an incoming batch; restricting the
replay term to those (rather than every output of the shared head) keeps the heads of future classes out of
the loss, which the paper's task-free setting implies (it never trains outputs of classes it has not met).
Task-IL streams work too: the loop's task mask applies on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltoolbox.params import PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.replay import ReplayPlugin


class ERACEPlugin(ReplayPlugin):
    """Reservoir replay (ER's) with the asymmetric loss of the module docstring as the step's criterion."""

    supports_ddp = True  # memory from the global batch (ER's); the criterion weighs each shard row by its term

    def __init__(self, memory_size: int, mem_batch_size: int | None) -> None:
        super().__init__(memory_size, "reservoir", mem_batch_size)
        self.seen: torch.Tensor | None = None  # bool (n_classes,): labels met in incoming batches so far

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        if self.seen is None:  # a resumed run already holds its classes
            self.seen = torch.zeros(stream.n_classes, dtype=torch.bool, device=learner.device)
        self.seen = self.seen.to(learner.device)

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        # transform_batch put the incoming samples first and the memory batch after, in the GLOBAL batch; under DDP
        # ``batch`` is this rank's contiguous rows of it (cltoolbox.distributed), so rows are told apart by their
        # global position, and the classes present come from the whole incoming batch (alike on every rank)
        whole = learner.global_batch
        n, n_in, d = len(whole), len(self._current), learner.dist
        lo = d.shard_rows(n)[0] if d is not None else 0
        present = torch.zeros_like(self.seen)
        present[whole.y[:n_in]] = True
        self.seen |= present
        incoming = torch.arange(lo, lo + len(batch), device=logits.device) < n_in
        allowed = torch.where(incoming.unsqueeze(1), present, self.seen)
        per_row = F.cross_entropy(logits.masked_fill(~allowed, MASKED_LOGIT), batch.y, reduction="none")
        # the two terms are means over the global batch's incoming and memory rows; this shard's part of their sum,
        # scaled by n / rows because the loop weights a shard's criterion by its share rows * world / n
        weight = torch.where(incoming, 1.0 / n_in, 1.0 / max(n - n_in, 1))
        return (per_row * weight).sum() * (n / max(len(batch), 1))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen_classes": self.seen}  # "seen" is the reservoir's count

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.seen = state.pop("seen_classes")
        super().load_state_dict(state)


@register_strategy("er_ace")
def er_ace(memory_size: PositiveInt = 500, mem_batch_size: PositiveInt | None = None) -> list[Plugin]:
    """ER-ACE (Caccia et al. 2022): ER whose incoming-batch loss only covers the classes in that batch.

    ``memory_size``: reservoir of stream keys (>= 1); ``mem_batch_size``: replayed samples per step (>= 1;
    null = the stream batch size, the paper's choice).
    """
    return [ERACEPlugin(memory_size, mem_batch_size)]
