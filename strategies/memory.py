"""Fixed-size episodic memories on the training device, shared by the replay strategies.

Every memory (reservoir, class-balanced, and GDumb's greedy one) keeps its samples in preallocated
tensors; sampling a replay batch is one randint and one gather, so its cost does not depend on the
memory size.
"""

from __future__ import annotations

import torch

from cltoolbox.plugin import Plugin, tensor_bytes


class Memory:
    """Storage of up to ``capacity`` (x, y, t) samples; ``size`` are valid."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None

    def _allocate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.x is None:
            self.x = x.new_zeros((self.capacity, *x.shape[1:]))
            self.y = y.new_zeros(self.capacity)
            self.t = y.new_zeros(self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=generator).to(self.x.device)
        return self.x.index_select(0, idx), self.y.index_select(0, idx), self.t.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"size": self.size, "x": self.x, "y": self.y, "t": self.t, **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.x, self.y, self.t = int(state["size"]), state["x"], state["y"], state["t"]

    def _extra_state(self) -> dict:
        return {}

    def usage(self) -> tuple[int, int]:
        return self.size, tensor_bytes(self.x, self.y, self.t) * self.size // max(1, self.capacity)


class ReservoirMemory(Memory):
    """Reservoir sampling (Vitter 1985): every sample seen so far is in memory with equal probability."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        self._allocate(x, y)
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
        dev = self.x.device
        src_d, slots_d = src.to(dev), slots.to(dev)
        self.x[slots_d] = x[src_d]
        self.y[slots_d] = y[src_d]
        self.t[slots_d] = t[src_d]
        self.seen += b
        self.size = min(self.capacity, self.seen)

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

    def update(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        self._allocate(x, y)
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
        dev = keep.to(self.x.device)
        # the kept inputs, in the order of `keep`, gathered from the memory and the new data directly: no
        # concatenation of all inputs (memory + a whole experience) just to select up to `capacity` of them
        old = dev < n
        kept_x = self.x.new_empty((len(keep), *self.x.shape[1:]))
        kept_x[old] = self.x[dev[old]]
        kept_x[~old] = x[dev[~old] - n]
        self.size = len(keep)
        self.x[: self.size], self.y[: self.size], self.t[: self.size] = kept_x, all_y[dev], all_t[dev]
        self.priority[: self.size] = all_p[keep]

    def _extra_state(self) -> dict:
        return {"priority": self.priority}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.priority = state.get("priority")


class MemoryPlugin(Plugin):
    """A plugin whose whole state is its replay ``memory``: checkpoints and memory accounting delegate to it."""

    memory: Memory

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)

    def memory_usage(self) -> tuple[int, int]:
        return self.memory.usage()
