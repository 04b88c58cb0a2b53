"""Gradient Episodic Memory (GEM) and Averaged GEM (A-GEM): gradient projection against episodic memories.

GEM, Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (NeurIPS): a memory of
``patterns_per_experience`` samples per finished experience. At every step the gradient g_k of the loss on
each past experience's memory is computed; if the current gradient g has <g, g_k> < 0 for some k (the
update would increase that memory's loss), g is replaced by the closest vector (L2) that has a
non-negative inner product with every g_k. That QP is solved in its dual (one variable per past
experience) with quadprog:

    min_v 1/2 v^T G G^T v + g^T G^T v   s.t.  v >= memory_strength,     g~ = G^T v + g

``memory_strength`` (gamma) is the paper's bias towards backward transfer ("adding a small constant
gamma >= 0 to v*"), implemented as a lower bound on v as in the authors' code; the authors chose 0.5 on
MNIST and 256 memories per task (Section 5, "Experiments").

A-GEM, Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM" (ICLR): one reference gradient
g_ref on a random batch of ``sample_size`` samples (256 in the paper) from the memory of all past
experiences; when g.g_ref < 0, g <- g - (g.g_ref / g_ref.g_ref) g_ref (Eq. 11 of the paper).
``patterns_per_experience`` = 250 as in ContinualAI's continual-learning-baselines for Permuted MNIST.

Memories are filled at the end of each experience with a random subset of its training data (the papers
keep the last samples of a single-pass stream; with shuffled batches both are uniform random subsets).
Memory losses use ``learner.forward(x, t)``: multi-head masking applies only when the stream gives task
labels (the GEM paper's setting); in class-IL the memory loss is plain cross-entropy over all outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltoolbox.errors import ConfigError
from cltoolbox.plugin import Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy


class ExperienceMemory:
    """Up to ``per_experience`` random training samples of each finished experience, kept per experience as
    stream keys (inputs: ``learner.fetch``) with their labels and task ids.

    The concatenation of all experiences is cached, so a random batch over the whole memory is one randint
    and one gather. ``item_bytes``: the native size of one sample (``Stream.sample_bytes``), for ``usage``.
    """

    def __init__(self, per_experience: int) -> None:
        self.per_experience = per_experience
        self.key: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []
        self.item_bytes = 0
        self._cat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def size(self) -> int:
        return sum(int(y.shape[0]) for y in self.y)

    def add(self, key: torch.Tensor, y: torch.Tensor, task_id: int, generator: torch.Generator) -> None:
        """Keep a random subset of one experience's training samples (``key``, labels ``y``)."""
        n = min(self.per_experience, int(y.shape[0]))
        idx = torch.randperm(int(y.shape[0]), generator=generator)[:n]
        self.key.append(key[idx.to(key.device)])
        self.y.append(y[idx.to(y.device)])
        self.t.append(torch.full_like(self.y[-1], task_id))
        self._cat = None

    def all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, y, t) of the whole memory."""
        if self._cat is None:
            self._cat = (torch.cat(self.key), torch.cat(self.y), torch.cat(self.t))
        return self._cat

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, y, t) of ``n`` entries drawn uniformly with replacement, or the whole memory when it holds <= n."""
        key, y, t = self.all()
        if y.shape[0] <= n:
            return key, y, t
        idx = torch.randint(y.shape[0], (n,), generator=generator).to(y.device)
        return key.index_select(0, idx.to(key.device)), y.index_select(0, idx), t.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"key": list(self.key), "y": list(self.y), "t": list(self.t)}

    def load_state_dict(self, state: dict) -> None:
        self.key, self.y, self.t = list(state["key"]), list(state["y"]), list(state["t"])
        self._cat = None

    def usage(self) -> tuple[int, int]:
        """(items, bytes): bytes as if each sample were stored at its native size, with its label and task id."""
        return self.size, self.size * self.item_bytes + tensor_bytes(*self.y, *self.t)


# -- flat gradients ---------------------------------------------------------------------------------------
def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The current .grad of ``params`` as one vector (zeros for parameters without a gradient)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_flat_grad(params: list[torch.nn.Parameter], vec: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = vec[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def memory_grad(learner, params: list[torch.nn.Parameter], data: torch.Tensor, y: torch.Tensor,
                t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat gradient of the cross-entropy on (data, y, t) at the current weights; leaves every .grad untouched.
    ``data``: stream keys (int64, fetched; a frozen extractor looks their features up by key) or model-ready
    inputs. ``out``: a preallocated vector to write it into (a row of GEM's constraint matrix)."""
    keys = None if torch.is_floating_point(data) else data
    x = data if keys is None else learner.fetch(keys)
    loss = F.cross_entropy(learner.forward(x, t, keys), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in pairs], out=out)


def _require_quadprog() -> None:
    try:
        import quadprog  # noqa: F401
    except ImportError as e:  # pragma: no cover - quadprog is a declared dependency
        raise ConfigError("strategy gem: needs the 'quadprog' package; install it with `pip install quadprog`") from e


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float = 1e-3) -> torch.Tensor:
    """Solve GEM's dual QP (Eq. 13 of the paper) for gradient ``g`` (P,) and memory gradients ``G`` (K, P).

    ``eps`` on the diagonal keeps G G^T positive definite for quadprog when memory gradients are collinear.
    """
    import numpy as np
    import quadprog

    k = G.shape[0]
    Gd, gd = G.double(), g.double()
    P = (Gd @ Gd.T).cpu().numpy()
    P = 0.5 * (P + P.T) + eps * np.eye(k)
    q = -(Gd @ gd).cpu().numpy()  # quadprog minimises 1/2 v'Pv - q'v subject to C'v >= b
    v = quadprog.solve_qp(P, q, np.eye(k), np.full(k, float(margin)))[0]
    return (gd + torch.from_numpy(v).to(Gd) @ Gd).to(g.dtype)


# -- plugins ----------------------------------------------------------------------------------------------
class GEMPlugin(Plugin):
    def __init__(self, patterns_per_experience: int, memory_strength: float) -> None:
        self.memory = ExperienceMemory(patterns_per_experience)
        self.memory_strength = memory_strength
        self.projections = 0  # steps whose gradient was projected (diagnostics, kept across resume)

    def after_backward(self, learner, batch: Batch) -> None:
        if len(self.memory) == 0:
            return
        params = trainable(learner.model)
        g = flat_grad(params)  # saved before the memory passes; those use autograd.grad, not .grad
        mem = self.memory
        G = g.new_empty((len(mem), g.shape[0]))  # each memory gradient is concatenated into its row
        for k in range(len(mem)):
            memory_grad(learner, params, mem.key[k], mem.y[k], mem.t[k], out=G[k])
        if bool((G @ g < 0).any()):
            write_flat_grad(params, gem_project(g, G, self.memory_strength))
            self.projections += 1

    def before_fit(self, learner, stream) -> None:
        self.memory.item_bytes = stream.sample_bytes()

    def after_experience(self, learner, exp) -> None:
        self.memory.add(learner.stream.keys(exp.train), exp.y_train, exp.task_id, learner.generator)

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.projections = int(state["projections"])

    def memory_usage(self) -> tuple[int, int]:
        return self.memory.usage()


class AGEMPlugin(GEMPlugin):
    def __init__(self, patterns_per_experience: int, sample_size: int) -> None:
        super().__init__(patterns_per_experience, 0.0)
        self.sample_size = sample_size

    def after_backward(self, learner, batch: Batch) -> None:
        if len(self.memory) == 0:
            return
        params = trainable(learner.model)
        g = flat_grad(params)
        g_ref = memory_grad(learner, params, *self.memory.sample(self.sample_size, learner.generator))
        dot = g @ g_ref
        if dot < 0:
            write_flat_grad(params, g - (dot / (g_ref @ g_ref).clamp_min(1e-12)) * g_ref)
            self.projections += 1


@register_strategy("gem")
def gem(patterns_per_experience: int = 256, memory_strength: float = 0.5) -> list[Plugin]:
    """Gradient Episodic Memory (Lopez-Paz & Ranzato 2017): project gradients that hurt past memories (QP)."""
    if patterns_per_experience < 1:
        raise ConfigError(f"strategy.patterns_per_experience: must be >= 1, got {patterns_per_experience}")
    if memory_strength < 0:
        raise ConfigError(f"strategy.memory_strength: must be >= 0, got {memory_strength}; the paper uses 0.5")
    _require_quadprog()
    return [GEMPlugin(patterns_per_experience, memory_strength)]


@register_strategy("agem")
def agem(patterns_per_experience: int = 250, sample_size: int = 256) -> list[Plugin]:
    """Averaged GEM (Chaudhry et al. 2019): project onto one reference gradient from a random memory batch."""
    if patterns_per_experience < 1:
        raise ConfigError(f"strategy.patterns_per_experience: must be >= 1, got {patterns_per_experience}")
    if sample_size < 1:
        raise ConfigError(f"strategy.sample_size: must be >= 1, got {sample_size}; the paper uses 256")
    return [AGEMPlugin(patterns_per_experience, sample_size)]
