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
MNIST and 256 memories per task (Section 5, "Experiments"). Unlike the authors' code (an absolute ridge
1e-3 on G G^T), the projected gradient meets every constraint: <g~, g_k> >= -1e-6 |g~| |g_k| (see
:func:`gem_project`); metrics.json's ``strategy`` section reports, per experience, the projected steps and
the worst cos(g~, g_k) after projection.

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

from typing import Any

import torch
import torch.nn.functional as F

from cltoolbox.errors import ConfigError
from cltoolbox.flat import flat_grad, trainable, write_flat_grad
from cltoolbox.params import NonNegative, PositiveInt
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


CONSTRAINT_TOL = 1e-6  # after projection every <g~, g_k> >= -CONSTRAINT_TOL * |g~| |g_k|
_RIDGES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)  # relative to max_k |g_k|^2; the next only if the previous fails


def constraint_cosines(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """cos(g, g_k) for every memory gradient (0 where a norm is 0): GEM's constraints <g, g_k> >= 0, scaled."""
    norms = G.norm(dim=1) * g.norm()
    return torch.where(norms > 0, (G @ g) / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float, tol: float = CONSTRAINT_TOL) -> torch.Tensor:
    """Solve GEM's dual QP (Eq. 13 of the paper) for gradient ``g`` (P,) and memory gradients ``G`` (K, P):

        min_v 1/2 v^T G G^T v + g^T G^T v   s.t.  v >= margin,     g~ = G^T v + g

    At the optimum, G g~ (the dual objective's gradient) is the constraints' multiplier vector, so
    <g~, g_k> >= 0 for every k, for any ``margin`` (gamma) >= 0: the paper's guarantee. A ridge r on G G^T
    (needed by quadprog when memory gradients are collinear) shifts it to <g~, g_k> >= -r v_k; the authors'
    code adds an absolute 1e-3, which breaks the constraints whenever |g_k|^2 is not much larger than 1e-3
    (on Split-MNIST-5k with an MLP 2x100, about half the projections, down to cosine -0.18). Here the QP is
    solved in float64, scaled by s = max_k |g_k|^2, with a ridge r = 1e-12 s, raised 100-fold at a time only
    while quadprog rejects the matrix as not positive definite or the result misses
    <g~, g_k> >= -``tol`` |g~| |g_k|; if no ridge meets it, the least violating result is returned (the
    plugin reports the worst cosine of every experience). A result shorter than 1e-6 |g| is rounding error
    around the exact g~ = 0 (all constraints active with g in the span of the memory gradients) and is
    returned as 0.
    """
    import numpy as np
    import quadprog

    k = G.shape[0]
    Gd, gd = G.double(), g.double()
    P = (Gd @ Gd.T).cpu().numpy()
    scale = float(np.max(np.diag(P)))
    if scale <= 0:  # every memory gradient is 0: no constraint to meet
        return g.clone()
    P = 0.5 * (P + P.T) / scale
    q = -(Gd @ gd).cpu().numpy() / scale  # quadprog minimises 1/2 v'Pv - q'v subject to C'v >= b
    best, best_cos = None, -np.inf
    for ridge in _RIDGES:
        try:
            v = quadprog.solve_qp(P + ridge * np.eye(k), q, np.eye(k), np.full(k, float(margin)))[0]
        except ValueError:  # "matrix G is not positive definite": a larger ridge
            continue
        out = gd + torch.from_numpy(v).to(Gd) @ Gd
        if out.norm() <= 1e-6 * gd.norm():  # the exact g~ is 0 (g lies in the memories' cone): this is rounding
            out = torch.zeros_like(gd)
        worst = float(constraint_cosines(out, Gd).min())
        if worst > best_cos:
            best, best_cos = out, worst
        if worst >= -tol:
            break
    if best is None:  # pragma: no cover - the largest ridge makes any Gram matrix positive definite
        raise RuntimeError("GEM's QP could not be solved")
    return best.to(g.dtype)


# -- plugins ----------------------------------------------------------------------------------------------
class GEMPlugin(Plugin):
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)
    def __init__(self, patterns_per_experience: int, memory_strength: float) -> None:
        self.memory = ExperienceMemory(patterns_per_experience)
        self.memory_strength = memory_strength
        self.projections = 0  # steps whose gradient was projected (diagnostics, kept across resume)
        # per experience (by index): projected steps, and the worst cos(g~, g_k) after projection (NaN: none)
        self.projections_per_exp: dict[int, int] = {}
        self.worst_cosine: dict[int, float] = {}

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
            out = gem_project(g, G, self.memory_strength)
            write_flat_grad(params, out)
            self.projections += 1
            e = learner.experience.index
            self.projections_per_exp[e] = self.projections_per_exp.get(e, 0) + 1
            worst = float(constraint_cosines(out.double(), G.double()).min())
            self.worst_cosine[e] = min(self.worst_cosine.get(e, worst), worst)

    def report(self, learner, stream) -> dict[str, Any]:
        """Per experience: ``gem_projections`` (steps whose gradient was projected) and ``gem_worst_cosine``
        (the smallest cos(g~, g_k) after any projection, >= -1e-6 when the constraints hold; null: no
        projection, e.g. the first experience)."""
        n = len(stream)
        return {"gem_projections": [self.projections_per_exp.get(e, 0) for e in range(n)],
                "gem_worst_cosine": [self.worst_cosine.get(e, float("nan")) for e in range(n)]}

    def before_fit(self, learner, stream) -> None:
        self.memory.item_bytes = stream.sample_bytes()

    def after_experience(self, learner, exp) -> None:
        self.memory.add(learner.stream.keys(exp.train), exp.y_train, exp.task_id, learner.generator)

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "projections": self.projections,
                "projections_per_exp": dict(self.projections_per_exp), "worst_cosine": dict(self.worst_cosine)}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.projections = int(state["projections"])
        self.projections_per_exp = {int(k): int(v) for k, v in state.get("projections_per_exp", {}).items()}
        self.worst_cosine = {int(k): float(v) for k, v in state.get("worst_cosine", {}).items()}

    def memory_usage(self) -> tuple[int, int]:
        return self.memory.usage()


class AGEMPlugin(GEMPlugin):
    supports_ddp = True  # per-batch state from the global batch only (cltoolbox.distributed)
    def __init__(self, patterns_per_experience: int, sample_size: int) -> None:
        super().__init__(patterns_per_experience, 0.0)
        self.sample_size = sample_size

    def report(self, learner, stream) -> dict[str, Any]:
        return {}  # A-GEM's single projection meets its constraint exactly (no QP)

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


@register_strategy("gem", test_params={"patterns_per_experience": 20})
def gem(patterns_per_experience: PositiveInt = 256, memory_strength: NonNegative = 0.5) -> list[Plugin]:
    """Gradient Episodic Memory (Lopez-Paz & Ranzato 2017): project gradients that hurt past memories (QP)."""
    _require_quadprog()
    return [GEMPlugin(patterns_per_experience, memory_strength)]


@register_strategy("agem", test_params={"patterns_per_experience": 20, "sample_size": 16})
def agem(patterns_per_experience: PositiveInt = 250, sample_size: PositiveInt = 256) -> list[Plugin]:
    """Averaged GEM (Chaudhry et al. 2019): project onto one reference gradient from a random memory batch."""
    return [AGEMPlugin(patterns_per_experience, sample_size)]
