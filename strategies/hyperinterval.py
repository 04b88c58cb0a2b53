"""HyperInterval: a hypernetwork maps interval task embeddings to interval weights of the target network.

Krukowski, Bielawska, Książek, Wawrzyński, Batorski and Spurek 2024, "HyperInterval: Hypernetwork approach to
training weight interval regions in continual learning" (arXiv 2405.15444, later titled HINT; building on
InterContiNet, Wołczyk et al. 2022, "Continual Learning with Guarantees via Weight Interval Constraints", and on
the task-conditioned hypernetworks of von Oswald et al. 2020, "Continual learning with hypernetworks").

* Each experience t owns an embedding interval [e_t - rho, e_t + rho]. A hypernetwork (MLP, ReLU) maps it by
  interval bound propagation (centre/radius form: a linear layer maps the centre by W and the radius by |W|,
  ReLU maps the bounds) to interval weights [W_low, W_up] of the target network, an MLP whose shapes are those
  of the configured ``mlp`` model (its own parameters are not used).
* The target network runs with interval weights (InterContiNet's arithmetic): for y = W z + b with W = Wc ± Wr
  and z = zc ± zr, the centre is Wc zc + bc and the radius (|Wc| + Wr) zr + Wr |zc| + br; ReLU maps the bounds.
* Loss (the authors' IBP loss): kappa * (CE(mid) + CE(lower) + CE(upper)) + (1 - kappa) * CE(worst case), the
  worst case taking the lower logit for the true class and the upper one for the others. The authors' schedule:
  over the first half of an experience's steps the radius grows linearly from 0 and kappa falls by 5e-5 a step;
  over the second half the radius is full and kappa is ``kappa_min``. Plus the hypernetwork regulariser of von
  Oswald et al.: beta times the mean over earlier experiences of the summed squared change of the hypernetwork's
  centre output for their (fixed) intervals since before this experience.
* Embeddings (the authors' parametrisation): centres e_t = s * cos(a_t) with learned angles a_t and the radius
  rho = ``radius`` / ``embedding_dim`` per dimension. The authors take s = rho / 2, so every task interval holds
  every possible centre; ``embedding_scale`` sets s apart from rho.
* Universal embedding: the centre of the intersection of the learned tasks' intervals (where a dimension's
  intervals do not meet, the midpoint between them, as the authors' ``intersection_of_embeds``); one network
  for every task, no task ids (``inference: universal``). ``task`` uses the embedding of the sample's task id
  (the paper's task-incremental evaluation); ``auto`` does so when the stream gives task ids at test time.
  metrics.json's ``strategy.hyperinterval_universal_acc`` is the universal network's ACC whichever is used.

Defaults from the authors' Permuted-MNIST configuration: embedding size 24, hypernetwork [100, 100],
perturbation 5.0, beta 0.005, Adam lr 0.001 and batch 128 (set in ``train:``); their target MLP is
[1000, 1000] on 32x32 padded inputs with 5,000 iterations a task. Deviations, measured on Permuted-MNIST-5k
with a 784-100-100-10 target and 5 epochs (160 steps) an experience (experiments/hyperinterval_check.py):
* Initialisation: the output layer's bias is a default-initialised target network and the hidden features'
  part starts at a tenth of that scale. With nn.Linear's default output layer (the authors' hypnettorch
  init) the generated weights' radius |W_out| r_h exceeds the weights, and the first experience stayed at
  chance (radius 0.25 and 5.0).
* Geometry: with s = rho / 2 the hypernetwork must give (nearly) the same weights to every embedding in the
  box, so the tasks share one network and beta trades forgetting for plasticity (5 experiences: forgetting
  0.131 at beta 0.5, ACC 0.586); the universal ACC then equals the task ACC. Spread centres with a small
  radius (``radius: 0.025, embedding_scale: 0.3, beta: 0.5``) give each task its own weights: forgetting
  ~0, while the intervals no longer intersect and the universal embedding is a midpoint without the
  paper's guarantee (its ACC is measured, lower than the task embeddings').
* The hypernetwork's ~9M output weights dominate the step: Adam runs its fused kernel (``param_groups``), the
  output layer's backward forms its weight gradient in three passes (``_IntervalOutput``), and the regulariser
  evaluates only the centre output (no |W| product) for all earlier tasks in one matrix product.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, NonNegative, PositiveInt
from cltoolbox.plugin import Plugin, tensor_bytes
from cltoolbox.registry import register_strategy

if TYPE_CHECKING:
    from cltoolbox.stream import Experience, Stream


def interval_linear(c: torch.Tensor, r: torch.Tensor | None, wc: torch.Tensor, wr: torch.Tensor, bc: torch.Tensor,
                    br: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius of z W^T + b for z in [c - r, c + r], W in [wc - wr, wc + wr], b in [bc - br, bc + br]
    (rows of ``c``/``r`` are samples; ``wc``/``wr`` are (out, in)); ``r=None`` is a point input."""
    centre = c @ wc.T + bc
    if r is None:
        return centre, c.abs() @ wr.T + br
    return centre, (r @ (wc.abs() + wr).T) + c.abs() @ wr.T + br


def interval_relu(c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = F.relu(c - r), F.relu(c + r)
    return (hi + lo) / 2, (hi - lo) / 2


class _IntervalOutput(torch.autograd.Function):
    """Centre W c + b and radius |W| r (r >= 0) of a linear layer for one interval c ± r (1-D), the hypernetwork's
    output layer. The weight gradient gc c^T + sign(W) * (gr r^T) is formed in three passes over W (sign(W) r as
    copysign(r, W), r being non-negative) instead of autograd's five through abs (sign, product, sum)."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        abs_w = w.abs()
        ctx.save_for_backward(c, r, w, abs_w)
        return F.linear(c, w, b), F.linear(r, abs_w)

    @staticmethod
    def backward(ctx, gc: torch.Tensor, gr: torch.Tensor):
        c, r, w, abs_w = ctx.saved_tensors
        # under autocast (bf16/fp16) the incoming gradients and saved inputs may be in the low precision: the
        # weight gradient is formed in the weight's dtype, the input gradients go back in the inputs' dtypes
        gc, gr = gc.to(w.dtype), gr.to(w.dtype)
        grad_w = torch.outer(gc, c.to(w.dtype)).addcmul_(gr.unsqueeze(1), torch.copysign(r.to(w.dtype).expand_as(w), w))
        return (gc @ w).to(c.dtype), (gr @ abs_w).to(r.dtype), grad_w, gc


class HyperNet(nn.Module):
    """MLP hypernetwork from an embedding interval to the flat interval weights of the target network."""

    def __init__(self, embedding_dim: int, hidden: list[int], shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes
        sizes = [embedding_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.out = nn.Linear(sizes[-1], sum(math.prod(s) for s in shapes))
        self._init_output(embedding_dim)

    @torch.no_grad()
    def _init_output(self, embedding_dim: int) -> None:
        """The output bias is a default-initialised target network (uniform +-1/sqrt(fan_in)); the hidden
        features' contribution starts at a tenth of that scale. With nn.Linear's default output layer (the
        authors' init) the generated weights' radius |W_out| r_h exceeds the weights themselves at every radius
        tried, and the first experience stayed at chance within 5 epochs (experiments/hyperinterval_check.py)."""
        h = torch.randn(256, embedding_dim)
        for layer in self.hidden:
            h = F.relu(layer(h))
        rms = float(h.pow(2).mean().sqrt().clamp_min(1e-6))
        start, fan_in = 0, 1
        for s in self.shapes:
            n = math.prod(s)
            fan_in = s[1] if len(s) > 1 else fan_in  # a bias follows its weight
            bound = 1 / math.sqrt(fan_in)
            self.out.bias[start : start + n].uniform_(-bound, bound)
            std = 0.1 * bound / math.sqrt(3)
            self.out.weight[start : start + n].normal_(0, std / (rms * math.sqrt(self.out.in_features)))
            start += n

    def features(self, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and radius of the last hidden layer for the embedding interval c ± r (rows: embeddings)."""
        for layer in self.hidden:  # point weights: the centre goes through W, the radius through |W|
            c, r = interval_relu(F.linear(c, layer.weight, layer.bias), F.linear(r, layer.weight.abs()))
        return c, r

    def centre(self, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Centre of the generated flat weights (what the regulariser keeps and inference uses): the output
        layer's radius, the costly |W| product, is not needed for it."""
        return self.out(self.features(c, r)[0])

    def forward(self, c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and radius of the generated flat weights for the embedding interval c ± r."""
        c, r = self.features(c, r)
        if c.dim() == 1:
            return _IntervalOutput.apply(c, r, self.out.weight, self.out.bias)
        return self.out(c), F.linear(r, self.out.weight.abs())

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(flat[..., start : start + n].view(*flat.shape[:-1], *s))
            start += n
        return out


class HyperIntervalPlugin(Plugin):
    def __init__(self, embedding_dim: int, hnet_hidden: list[int], radius: float, beta: float, kappa_min: float,
                 inference: str, embedding_scale: float | None = None) -> None:
        self.embedding_dim, self.hnet_hidden = embedding_dim, hnet_hidden
        # the authors' split of the perturbation budget: radius eps/M per dimension, centres (eps/2M) cos(a), so
        # every task interval holds every other task's centre and the intersection is never empty
        self.rho = radius / embedding_dim
        self.sigma = radius / (2 * embedding_dim) if embedding_scale is None else embedding_scale
        self.beta, self.kappa_min, self.inference = beta, kappa_min, inference
        self.hnet: HyperNet | None = None
        self.angles: list[torch.Tensor] = []  # a_t of the experiences learned, fixed once learned
        self.task_of_exp: list[int] = []
        self.current: nn.Parameter | None = None
        self._old: torch.Tensor | None = None  # centres of the earlier embeddings, (k, M)
        self._targets: torch.Tensor | None = None  # the hypernetwork's outputs for them before this experience
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._use_task_ids = False
        self._step = 0
        self._n_steps = 1
        self._pending: dict[str, torch.Tensor] | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def _linears(self, model: nn.Module) -> list[nn.Linear]:
        return [m for m in model.modules() if isinstance(m, nn.Linear)]

    def check(self, model, stream) -> None:
        linears = self._linears(model)
        acts = [m for m in model.modules() if isinstance(m, (nn.Tanh, nn.Dropout, nn.Conv2d))]
        if not linears or acts or linears[-1] is not getattr(model, "head", None):
            raise ConfigError("model: hyperinterval generates the weights of a ReLU mlp (no dropout); use "
                              "model: {name: mlp, hidden: [400, 400]}")
        if self.inference == "task" and not self._distinct_tasks(stream):
            raise ConfigError("strategy.inference: task needs a task id per experience (task_incremental, permuted "
                              "or rotated streams); use inference: universal")

    @staticmethod
    def _distinct_tasks(stream: Stream) -> bool:
        ids = [e.task_id for e in stream.experiences]
        return len(set(ids)) == len(ids)

    def before_fit(self, learner, stream: Stream) -> None:
        model = learner.model
        self.check(model, stream)
        model.requires_grad_(False)  # the hypernetwork generates every weight
        if self.hnet is None:
            shapes = []
            for m in self._linears(model):
                shapes += [tuple(m.weight.shape), tuple(m.bias.shape)]
            gen_state = torch.get_rng_state()
            torch.manual_seed(learner.seed)
            self.hnet = HyperNet(self.embedding_dim, self.hnet_hidden, shapes).to(learner.device)
            torch.set_rng_state(gen_state)
        if self._pending:  # a checkpoint loaded before the hypernetwork existed
            self.hnet.load_state_dict(self._pending)
            self._pending = None
        self._use_task_ids = self.inference == "task" or (self.inference == "auto" and stream.task_labels)

    def parameters(self) -> list[torch.Tensor]:
        params = [] if self.hnet is None else list(self.hnet.parameters())
        return params + ([self.current] if self.current is not None else [])

    def param_groups(self, learner, params: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        """Adam's fused kernel (one pass over the ~9M hypernetwork outputs' weights instead of a dozen): the same
        update, a third of the step's time on a CPU."""
        if learner.config.optimizer not in ("adam", "adamw") or learner.device.type not in ("cpu", "cuda"):
            return None
        return [{"params": params, "fused": True}]

    # -- embeddings -------------------------------------------------------------------------------------
    def embedding(self, angles: torch.Tensor) -> torch.Tensor:
        return self.sigma * torch.cos(angles)

    def universal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and radius of the intersection of the learned tasks' embedding intervals; a dimension where they
        do not meet gets the midpoint between the highest lower and the lowest upper bound, radius 0."""
        es = torch.stack([self.embedding(a) for a in self.angles])
        lo, hi = (es - self.rho).amax(0), (es + self.rho).amin(0)
        return (lo + hi) / 2, (hi - lo).clamp_min(0) / 2

    # -- training ---------------------------------------------------------------------------------------
    def before_experience(self, learner, exp: Experience) -> None:
        g = torch.Generator().manual_seed(learner.seed * 7919 + exp.index)
        self.current = nn.Parameter(torch.rand(self.embedding_dim, generator=g).mul(2 * math.pi).to(learner.device))
        self._old = self._targets = None
        if self.angles:  # the hypernetwork's outputs for earlier intervals, kept by the regulariser
            self._old = torch.stack([self.embedding(a) for a in self.angles])
            with torch.no_grad():
                self._targets = self.hnet.centre(self._old, torch.full_like(self._old, self.rho))
        n = len(exp.y_train)
        bs = learner.config.batch_size
        self._n_steps = max(1, learner.config.epochs * ((n + bs - 1) // bs))
        self._step = 0

    def _schedule(self) -> tuple[float, float]:
        """(kappa, radius scale) of this step, the authors' schedule: over the first half of the experience's
        steps the radius grows linearly from 0 to full and kappa falls by 5e-5 a step (floored at kappa_min);
        over the second half both stay at full radius and kappa_min."""
        half = self._n_steps // 2
        if self._step < half:
            return max(1.0 - 5e-5 * self._step, self.kappa_min), self._step / max(1, half - 1)
        return self.kappa_min, 1.0

    def forward(self, learner, x, t):
        _, ramp = self._schedule()
        c_emb = self.embedding(self.current)
        wc, wr = self.hnet(c_emb, torch.full_like(c_emb, ramp * self.rho))
        wc, wr = self.hnet.split(wc), self.hnet.split(wr.clamp_min(0))
        c, r = x.flatten(1), None  # point inputs: the first layer skips the input-radius products
        n_layers = len(wc) // 2
        for i in range(n_layers):
            c, r = interval_linear(c, r, wc[2 * i], wr[2 * i], wc[2 * i + 1], wr[2 * i + 1])
            if i < n_layers - 1:
                c, r = interval_relu(c, r)
        self._bounds = (c - r, c + r)
        return c

    def criterion(self, learner, batch, logits):
        lo, hi = self._bounds
        if learner.multi_head:
            mask = ~learner.task_mask[batch.t]
            lo, hi = lo.masked_fill(mask, -1e9), hi.masked_fill(mask, -1e9)
        kappa, _ = self._schedule()
        self._step += 1
        fit = F.cross_entropy(logits, batch.y) + F.cross_entropy(lo, batch.y) + F.cross_entropy(hi, batch.y)
        true = F.one_hot(batch.y, logits.shape[1]).bool()
        worst = F.cross_entropy(torch.where(true, lo, hi), batch.y)
        return kappa * fit + (1 - kappa) * worst

    def loss(self, learner, batch, logits):
        if self._old is None:
            return 0.0
        now = self.hnet.centre(self._old, torch.full_like(self._old, self.rho))
        return self.beta * (now - self._targets).pow(2).sum(1).mean()

    def after_experience(self, learner, exp: Experience) -> None:
        self.angles.append(self.current.detach().clone())
        self.task_of_exp.append(exp.task_id)
        self.current = None
        self._old = self._targets = None

    # -- inference --------------------------------------------------------------------------------------
    def _point_logits(self, x: torch.Tensor, emb: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Logits of the network whose weights are the centre of the interval weights generated for the embedding
        interval ``emb`` ± ``radius`` (the output the regulariser keeps fixed)."""
        wc = self.hnet.split(self.hnet.centre(emb, radius))
        h = x.flatten(1)
        n_layers = len(wc) // 2
        for i in range(n_layers):
            h = F.linear(h, wc[2 * i], wc[2 * i + 1])
            if i < n_layers - 1:
                h = F.relu(h)
        return h

    def predict(self, learner, x, task_ids):
        if not self.angles:
            return None
        if not self._use_task_ids:
            return self._point_logits(x, *self.universal())
        out = None
        for tid in task_ids.unique().tolist():
            rows = task_ids == tid
            # the latest experience with this task id (tasks not learned yet: the universal embedding)
            idx = max((i for i, t in enumerate(self.task_of_exp) if t == tid), default=None)
            if idx is None:
                emb, radius = self.universal()
            else:
                emb = self.embedding(self.angles[idx])
                radius = torch.full_like(emb, self.rho)
            logits = self._point_logits(x[rows], emb, radius)
            if out is None:
                out = logits.new_empty(len(x), logits.shape[1])
            out[rows] = logits
        return out

    @torch.no_grad()
    def report(self, learner, stream) -> dict[str, Any]:
        """The final universal embedding's accuracy on every experience's test set (no task ids), whichever
        embedding the evaluation used, and the intersection's mean radius."""
        centre, r = self.universal()
        accs = []
        for e in stream.experiences:
            correct = 0
            y = e.y_test.to(learner.device)
            start = 0
            for keys, x in learner.batches(stream.keys(e.test)):
                pred = self._point_logits(x, centre, r).argmax(1)
                correct += int((pred == y[start : start + len(keys)]).sum())
                start += len(keys)
            accs.append(correct / max(1, len(y)))
        return {"hyperinterval_inference": "task" if self._use_task_ids else "universal",
                "hyperinterval_universal_acc": sum(accs) / len(accs), "hyperinterval_universal_acc_per_exp": accs,
                "hyperinterval_universal_radius_mean": float(r.mean())}

    def cost(self) -> dict[str, float]:
        return {"hypernet_params": sum(p.numel() for p in self.hnet.parameters())} if self.hnet is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"hnet": {} if self.hnet is None else self.hnet.state_dict(), "angles": self.angles,
                "task_of_exp": self.task_of_exp}

    def load_state_dict(self, state) -> None:
        self.angles, self.task_of_exp = list(state["angles"]), list(state["task_of_exp"])
        self._pending = state["hnet"] or None
        if self.hnet is not None and self._pending:
            self.hnet.load_state_dict(self._pending)
            self._pending = None

    def memory_usage(self) -> tuple[int, int]:
        return len(self.angles), tensor_bytes(*self.angles)


@register_strategy("hyperinterval", test_params={"hnet_hidden": [20]})
def hyperinterval(embedding_dim: PositiveInt = 24, hnet_hidden: list[PositiveInt] = [100, 100],  # noqa: B006
                  radius: NonNegative = 5.0, beta: NonNegative = 0.005,
                  kappa_min: Annotated[float, Interval(0, 1)] = 0.5,
                  inference: Literal["auto", "task", "universal"] = "auto",
                  embedding_scale: NonNegative | None = None) -> list[Plugin]:
    """HyperInterval (Krukowski et al. 2024): interval task embeddings -> hypernetwork -> interval weights of the
    mlp, worst-case loss plus the hypernetwork regulariser; ``inference: universal`` predicts without task ids
    from the intersection of the task intervals. ``embedding_scale`` (null: the authors' radius / (2 embedding_dim))
    sets the spread of the task centres apart from the radius. Use Adam, lr 0.001, batch 128 in ``train:`` as the
    paper."""
    return [HyperIntervalPlugin(embedding_dim, list(hnet_hidden), radius, beta, kappa_min, inference, embedding_scale)]
