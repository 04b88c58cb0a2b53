"""Fixed-size episodic memories on the training device, shared by the replay strategies.

A memory stores the stream keys of its samples (see ``cltoolbox.stream``), with their labels and task ids,
never copies of the samples: replaying fetches them from their source like any training batch
(``learner.fetch``), so a memory over ImageNet-R costs 24 bytes a sample, and checkpoints stay small.
``usage`` still reports what the stored samples would occupy at their native size (``item_bytes``, set from
the stream), so accuracy-vs-memory comparisons with methods that copy samples stay fair.

Every memory (reservoir, class-balanced, and GDumb's greedy one) keeps its entries in preallocated
tensors; sampling a replay batch is one randint and one gather, so its cost does not depend on the
memory size.
"""

from __future__ import annotations

import torch

from cltoolbox.plugin import Plugin, tensor_bytes


class Memory:
    """Storage of up to ``capacity`` (key, y, t) entries; ``size`` are valid. ``item_bytes``: the native size of
    one stored sample (``Stream.sample_bytes``), for ``usage``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.item_bytes = 0
        self.key: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None

    def _allocate(self, key: torch.Tensor, y: torch.Tensor) -> None:
        if key is None:
            raise ValueError("a memory stores stream samples by key; this batch has no keys (Batch.key is None)")
        if self.key is None:
            self.key = key.new_zeros(self.capacity)
            self.y = y.new_zeros((self.capacity, *y.shape[1:]))  # multi-label streams: multi-hot rows
            self.t = y.new_zeros(self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, y, t) of ``n`` entries drawn uniformly with replacement; inputs: ``learner.fetch(keys)``."""
        idx = torch.randint(self.size, (n,), generator=generator).to(self.key.device)
        return self.key.index_select(0, idx), self.y.index_select(0, idx), self.t.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"size": self.size, "key": self.key, "y": self.y, "t": self.t, "item_bytes": self.item_bytes,
                **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.key, self.y, self.t = int(state["size"]), state["key"], state["y"], state["t"]
        self.item_bytes = int(state["item_bytes"])

    def _extra_state(self) -> dict:
        return {}

    def usage(self) -> tuple[int, int]:
        """(items, bytes): bytes as if each sample were stored at its native size, with its label and task id."""
        per_item = self.item_bytes + (0 if self.y is None else tensor_bytes(self.y[:1], self.t[:1]))
        return self.size, per_item * self.size


class ReservoirMemory(Memory):
    """Reservoir sampling (Vitter 1985): every sample seen so far is in memory with equal probability."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.seen = 0

    def add(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Offer a batch; returns (rows of the batch that were stored, the slots they now fill), on the memory's
        device, for memories that keep more per entry (DER's logits)."""
        self._allocate(key, y)
        b = y.shape[0]
        pos = torch.arange(self.seen, self.seen + b)
        # sample i (0-based count pos) lands in slot pos if memory is not full, else in randint(pos + 1)
        draw = (torch.rand(b, generator=generator) * (pos + 1).double()).long()
        slots = torch.where(pos < self.capacity, pos, draw)
        keep = slots < self.capacity
        src, slots = torch.nonzero(keep).flatten(), slots[keep]
        if slots.numel() > 1:  # two samples of one batch drew the same slot: the later one wins, as sequentially
            # O(batch), not O(capacity): reduce over the distinct slots only
            uniq, inv = torch.unique(slots, return_inverse=True)
            src = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce(0, inv, src, reduce="amax",
                                                                          include_self=False)
            slots = uniq
        dev = self.key.device
        src_d, slots_d = src.to(dev), slots.to(dev)
        self.key[slots_d] = key[src_d]
        self.y[slots_d] = y[src_d]
        self.t[slots_d] = t[src_d]
        self.seen += b
        self.size = min(self.capacity, self.seen)
        return src_d, slots_d

    def _extra_state(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = int(state["seen"])


class ClassBalancedMemory(Memory):
    """Equal slots per class seen so far, refilled after each experience.

    Every sample gets a random priority once, when it is offered; each class keeps its highest-priority
    samples. So each class's slots hold a uniform random sample of *all* its samples seen so far, also
    when classes recur across experiences (domain-incremental streams), not a bias towards the latest
    experience. When new classes arrive, old classes give up their lowest-priority surplus; a class holds
    at most ``capacity // n_seen_classes`` samples (the remainder goes to the smallest class ids).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.priority: torch.Tensor | None = None

    def update(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        self._allocate(key, y)
        if self.priority is None:
            self.priority = torch.zeros(self.capacity)
        n = self.size
        all_y, all_t = torch.cat((self.y[:n], y)), torch.cat((self.t[:n], t))
        all_p = torch.cat((self.priority[:n], torch.rand(y.shape[0], generator=generator)))
        labels = all_y.cpu()
        classes = torch.unique(labels)
        quota, extra = divmod(self.capacity, len(classes))
        keep = []
        for rank, c in enumerate(classes.tolist()):
            idx = torch.nonzero(labels == c).flatten()
            k = min(len(idx), quota + (1 if rank < extra else 0))
            keep.append(idx[torch.topk(all_p[idx], k).indices.sort().values])
        keep = torch.cat(keep)
        dev = keep.to(self.key.device)
        all_key = torch.cat((self.key[:n], key))
        self.size = len(keep)
        self.key[: self.size], self.y[: self.size], self.t[: self.size] = all_key[dev], all_y[dev], all_t[dev]
        self.priority[: self.size] = all_p[keep]

    def _extra_state(self) -> dict:
        return {"priority": self.priority}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.priority = state.get("priority")


class MemoryPlugin(Plugin):
    """A plugin whose whole state is its replay ``memory``: checkpoints and memory accounting delegate to it."""

    memory: Memory

    def before_fit(self, learner, stream) -> None:
        self.memory.item_bytes = stream.sample_bytes()

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)

    def memory_usage(self) -> tuple[int, int]:
        return self.memory.usage()
