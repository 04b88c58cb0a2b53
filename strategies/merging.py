"""Model merging as continual learning: task vectors fine-tuned per experience and merged into one model.

* ``task_arithmetic`` - Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi and Farhadi, ICLR 2023,
  "Editing Models with Task Arithmetic": fine-tune a copy of the shared starting weights theta_0 on each
  experience, keep its task vector tau_t = theta_t - theta_0, and evaluate theta_0 + lambda * sum_t tau_t with
  lambda picked on held-out validation data from {0, 0.05, ..., 1.0} (the paper's grid).
* ``ties_merging`` - Yadav, Tam, Choshen, Raffel and Bansal, NeurIPS 2023, "TIES-Merging: Resolving
  Interference When Merging Models": trim each task vector to its top-k% magnitudes (k = 20), elect each
  parameter's sign by the larger total magnitude, average only the values that agree with it (disjoint mean),
  scale by lambda (default 1, the paper's choice without validation; ``lam: null`` picks it on validation
  from 0.8..1.8, a grid around that default).
* ``adamerging`` - Yang, Wang, Shen, Liu, Guo, Wang and Tao, ICLR 2024, "AdaMerging: Adaptive Model Merging
  for Multi-Task Learning": one coefficient per task and layer (parameter tensor; ``granularity: task`` for
  one per task), initialised at 0.3, clamped to [0, 1], learned by minimising the prediction entropy on
  **unlabeled test inputs** (test-time adaptation, as the paper does; ``unlabeled: validation`` uses the
  held-out training split without its labels instead), each experience's inputs scored over its own classes as
  the paper scores each task with its own head (``entropy_over: seen``: over all classes seen), with Adam
  (lr 1e-3, 500 steps, 16 inputs per task a step): the paper's settings and the defaults here. The learned
  coefficients are written to metrics.json (``strategy.adamerging_coefficients``: one row per merge, task and
  layer). Class-IL options (not in the paper, which evaluates each task with its own head): ``init:
  task_arithmetic`` starts every coefficient at the lambda task arithmetic picks on the held-out split (the
  paper's 0.3 is a typical task arithmetic pick on its CLIP benchmarks; here that pick is 0.05-0.25), and ``select:
  validation`` keeps, of the coefficients after 0, steps/10, 2 steps/10, ... steps, those with the best class-IL
  accuracy on the held-out split (early stopping on the data task arithmetic already uses; earliest on ties).
  Neither uses test labels; with both, the entropy steps are kept only where the held-out accuracy says they
  help (``strategy.adamerging_steps_kept``: how many, per merge).
* ``magmax`` - Marczak, Twardowski, Trzcinski and Cygert, ECCV 2024, "MagMax: Leveraging Model Merging for
  Seamless Continual Learning": sequential fine-tuning (each experience starts from the previous
  *fine-tuned* weights), and after each experience the merged vector keeps, per parameter, the task vector
  entry of largest magnitude. Max-magnitude selection is associative, so only the running merged vector is
  kept (plus theta_0 and the fine-tuned weights): no per-task storage. Merged model theta_0 + 0.5 * m
  (the paper's lambda).

What is fine-tuned and merged: every trainable parameter of the model except its head (for ``mlp``: the hidden
layers; for ``efficientnet_lite0_tail``: its last MBConv block(s) and 1x1 conv head, the encoder layers the papers
fine-tune, with the earlier blocks frozen and cached) plus, with ``adapter: N``, a residual bottleneck adapter on
``model.features`` (f + up(relu(down(f))), ``up`` initialised at zero so theta_0 is the pre-trained model). On a
wholly frozen backbone (``efficientnet_lite0``, ``vit``) the adapter is the only fine-tuned part.

Class-incremental heads. The papers merge CLIP image encoders and classify with fixed zero-shot heads (text
embeddings compared by cosine similarity, never fine-tuned); MagMax's class-incremental setting compares the
heads of all classes seen so far. Here the model's linear layer plays that role, frozen: at the start of an
experience its classes' rows are set to their mean feature under the starting weights (a data-derived head; no
text encoder here), logits are ``head_scale`` * cos(feature, row) (bias unused), and fine-tuning trains the
body/adapter with the cross-entropy over that experience's classes only (``finetune_over: seen``: also over the
fixed rows of the classes seen before, so the task vector learns to keep its classes away from theirs).
Rows fine-tuned per task separately (tried first) lose cross-task calibration: every class-IL prediction fell
on the first task's classes (ACC 0.22 on Split-MNIST-5k). Only the body/adapter is merged; prediction compares
all seen classes' cosines (no task ids). ``head_init: orthogonal`` instead fixes every class's row before any data
to seeded orthonormal vectors: data-independent like the text heads, so the pre-trained model alone is at chance
and what the merged model knows comes from the task vectors, the papers' regime (their zero-shot models are far
below their fine-tuned ones). Class-mean rows are themselves a nearest-class-mean classifier (SimpleCIL's), which
leaves merging little to add on Split-MNIST-5k (README: lambda 0 reaches 0.76, the best merge 0.78).

Held-out data. ``val_fraction`` of each experience's training set is held out (a seeded random subset)
and kept as stream keys: lambda is picked on the class-IL accuracy over the held-out sets of all experiences so
far (the paper picks it on the tasks' validation sets). Memory accounting counts these keys, theta_0 and the
stored task vectors (MagMax: the running merged vector and the fine-tuned weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import sample_keys
from cltoolbox.params import Interval, Min, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.extractor import class_mask, require_features_and_head

if TYPE_CHECKING:
    from cltoolbox.stream import Experience, Stream

Params = dict[str, torch.Tensor]
TA_GRID = [round(0.05 * i, 2) for i in range(21)]
TIES_GRID = [round(0.8 + 0.1 * i, 1) for i in range(11)]
TEST_SETTINGS = {"val_fraction": 0.2}


class Adapter(nn.Module):
    """Residual bottleneck adapter f + up(relu(down(f))); ``up`` starts at zero (the identity map)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.up(F.relu(self.down(f)))


class CosineNet(nn.Module):
    """model.features -> optional adapter -> cosine logits over the head's rows (one module for functional
    calls with merged parameters)."""

    def __init__(self, model: nn.Module, adapter: nn.Module | None, scale: float) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter if adapter is not None else nn.Identity()
        self.scale = scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.model.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cosine(self.embed(x))

    def cosine(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(f, dim=1) @ F.normalize(self.model.head.weight, dim=1).T


# -- merge rules (pure functions over lists of task-vector tensors, tested on small tensors) ------------------
def ties_merge(taus: list[torch.Tensor], keep: float) -> torch.Tensor:
    """TIES-Merging of one parameter's task vectors: trim each to its top ``keep`` fraction by magnitude, elect
    the sign with the larger total magnitude, average the kept entries that agree with it (disjoint mean)."""
    trimmed = []
    for tau in taus:
        flat = tau.flatten()
        k = max(1, int(round(keep * flat.numel())))
        thresh = flat.abs().kthvalue(flat.numel() - k + 1).values if k < flat.numel() else flat.abs().min()
        trimmed.append(torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0).clamp_min(1)
    return (stack * agree).sum(0) / count


def max_magnitude(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MagMax's per-entry selection: the entry of larger magnitude (``a`` on ties). Associative, so a running
    merge over task vectors equals the merge of all of them at once."""
    return torch.where(b.abs() > a.abs(), b, a)


class MergingPlugin(Plugin):
    """Shared machinery: per-experience fine-tuning from the start weights, task vectors, validation split,
    fixed class-mean cosine heads. Subclasses define ``merge`` (the body/adapter part of the evaluated model)."""

    method = "merging"
    sequential = False  # MagMax: each experience starts from the previous fine-tuned weights
    lambda_on = "class_il"  # what held-out accuracy scores (task arithmetic and TIES may pick task_il)
    head_init = "class_mean"  # or "orthogonal": fixed seeded orthonormal rows, set before any data is seen

    def __init__(self, adapter: int, head_scale: float, val_fraction: float, finetune_over: str = "task") -> None:
        self.adapter_dim = adapter
        self.finetune_over = finetune_over
        self.head_scale = head_scale
        self.val_fraction = val_fraction
        self.adapter: Adapter | None = None
        self.net: CosineNet | None = None
        self.theta0: Params = {}
        self.val_keys: list[torch.Tensor] = []
        self.val_y: list[torch.Tensor] = []
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.n_merged = 0

    # -- set-up -----------------------------------------------------------------------------------------
    def check(self, model, stream) -> None:
        require_features_and_head(model, self.method)
        if self.head_init == "orthogonal" and stream.n_classes > model.head.in_features:
            raise ConfigError(f"strategy.head_init: orthogonal needs no more classes ({stream.n_classes}) than feature "
                              f"dimensions ({model.head.in_features}); use class_mean")

    def before_fit(self, learner, stream: Stream) -> None:
        model = learner.model
        self.check(model, stream)
        if self.adapter_dim > 0 and self.adapter is None:
            self.adapter = Adapter(model.head.in_features, self.adapter_dim).to(learner.device)
        model.head.requires_grad_(False)  # rows are set from class means, like the papers' fixed zero-shot heads
        self.net = CosineNet(model, self.adapter, self.head_scale)
        if not self.theta0:
            self.theta0 = {k: v.detach().clone() for k, v in self._tuned().items()}
            self.seen = torch.zeros(stream.n_classes, dtype=torch.bool)
            if self.head_init == "orthogonal":  # every class's row, fixed before any data (as text heads are)
                gen = torch.Generator().manual_seed(learner.seed)
                q, _ = torch.linalg.qr(torch.randn(model.head.in_features, stream.n_classes, generator=gen))
                with torch.no_grad():
                    model.head.weight.copy_(q.T)
        if not self._body_names():
            raise ConfigError(f"strategy.adapter: {self.method} has nothing to merge (the model's only trainable part "
                              "is its head: a frozen backbone); set adapter: 64 or unfreeze the model")

    def parameters(self) -> list[torch.Tensor]:
        return [] if self.adapter is None else list(self.adapter.parameters())

    def _tuned(self) -> dict[str, nn.Parameter]:
        """The fine-tuned tensors, by their name in ``CosineNet``: trainable model parameters and the adapter."""
        return {k: p for k, p in self.net.named_parameters() if p.requires_grad}

    def _body_names(self) -> list[str]:
        return [k for k in self.theta0 if not k.startswith("model.head.")]

    def _set(self, values: Params) -> None:
        with torch.no_grad():
            tuned = self._tuned()
            for k, v in values.items():
                tuned[k].copy_(v)

    def _current(self) -> Params:
        return {k: p.detach().clone() for k, p in self._tuned().items()}

    # -- training ---------------------------------------------------------------------------------------
    def forward(self, learner, x, t):
        # cross-entropy over the experience's own classes: its task vector touches only their head rows
        return self.net(x).masked_fill(self._others, MASKED_LOGIT)

    def train_experience(self, learner, exp: Experience) -> bool:
        keys, y = learner.stream.keys(exp.train), exp.y_train
        n_val = int(round(self.val_fraction * len(y)))
        order = torch.randperm(len(y), generator=learner.generator)
        val, train = order[:n_val], order[n_val:]
        self.val_keys.append(keys[val].clone())
        self.val_y.append(y[val].clone())
        rows = class_mask(learner.stream.n_classes, exp.classes, learner.device)  # the experience's head rows
        # the cross-entropy's classes: the experience's own, or also the (fixed) rows of the classes seen before
        self._others = ~(rows | self.seen.to(learner.device)) if self.finetune_over == "seen" else ~rows
        self._set(self.start_weights())
        self._init_rows(learner, keys[train], y[train], exp.classes)
        task = torch.full_like(y[train], exp.task_id)
        learner.train_data(keys[train], y[train], task)
        theta = self._current()
        tau = {k: theta[k] - self.theta0[k] for k in theta}
        for k in ("model.head.weight", "model.head.bias"):
            if k in tau:  # only this experience's classes' rows belong to its task vector
                tau[k] = tau[k] * (rows.view(-1, *([1] * (tau[k].dim() - 1))))
        self.seen[torch.as_tensor(list(exp.classes))] = True
        self.add_task(learner, exp, tau, theta)
        self._set(self.merged(learner))
        self.n_merged += 1
        return True

    @torch.no_grad()
    def _init_rows(self, learner, keys: torch.Tensor, y: torch.Tensor, classes: list[int]) -> None:
        """The experience's head rows start at their classes' mean feature (a data-derived head, the role CLIP's
        zero-shot text heads play in the papers)."""
        if self.head_init == "orthogonal":  # fixed at the start of the run
            return
        head = learner.model.head.weight
        sums = torch.zeros(head.shape[0], head.shape[1], device=learner.device)
        counts = torch.zeros(head.shape[0], device=learner.device)
        was = self.net.training
        self.net.eval()
        ys = y.to(learner.device)
        start = 0
        for k, x in learner.batches(keys):
            with sample_keys(k, learner.stream):
                f = F.normalize(self.net.embed(x), dim=1)
            yb = ys[start : start + len(k)]
            start += len(k)
            sums.index_add_(0, yb, f)
            counts.index_add_(0, yb, torch.ones_like(yb, dtype=counts.dtype))
        self.net.train(was)
        cls = torch.as_tensor(list(classes), device=learner.device)
        ok = cls[counts[cls] > 0]
        head[ok] = sums[ok] / counts[ok].unsqueeze(1)

    # -- merging (subclass API) -----------------------------------------------------------------------
    def start_weights(self) -> Params:
        return self.theta0

    def add_task(self, learner, exp: Experience, tau: Params, theta: Params) -> None:
        raise NotImplementedError

    def merged(self, learner) -> Params:
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------------
    def predict(self, learner, x, task_ids):
        if self.n_merged == 0:
            return None
        logits = self.net(x).float()
        return logits.masked_fill(~self.seen.to(logits.device), MASKED_LOGIT)

    def _heads(self, taus: list[Params]) -> Params:
        """Head rows as each task fine-tuned them (task vectors of the head are disjoint by rows)."""
        out = {}
        for k in ("model.head.weight", "model.head.bias"):
            if k in self.theta0:
                out[k] = self.theta0[k] + sum(t[k] for t in taus)
        return out

    @torch.no_grad()
    def val_accuracy(self, learner, params: Params) -> float:
        """Accuracy over the held-out sets of every experience so far, with ``params`` in the model: class-IL (over
        every class seen) or, with ``lambda_on: task_il``, task-aware (over the classes of the sample's own
        experience: the per-task heads of the papers' multi-task evaluation)."""
        stream = learner.stream
        correct, total = 0, 0
        self.net.eval()
        for j, (keys, y) in enumerate(zip(self.val_keys, self.val_y, strict=True)):
            allowed = self.seen if self.lambda_on == "class_il" else \
                class_mask(stream.n_classes, stream.experiences[j].classes, "cpu")
            allowed, y, start = allowed.to(learner.device), y.to(learner.device), 0
            for k, x in learner.batches(keys):
                with sample_keys(k, stream):
                    logits = functional_call(self.net, params, (x,))
                logits = logits.masked_fill(~allowed, MASKED_LOGIT)
                correct += int((logits.argmax(1) == y[start : start + len(k)]).sum())
                start += len(k)
            total += len(y)
        self.net.train()
        return correct / max(1, total)

    def pick_lambda(self, learner, grid: list[float], build) -> float:
        """The grid value whose merged model (``build(lam)``) has the best held-out accuracy (first on ties)."""
        if not self.val_keys or sum(len(v) for v in self.val_keys) == 0:
            raise ConfigError(f"strategy.val_fraction: {self.method} picks lambda on held-out data and none is "
                              "held out; set val_fraction > 0 or give a fixed lam")
        scores = [self.val_accuracy(learner, build(lam)) for lam in grid]
        return grid[max(range(len(grid)), key=lambda i: scores[i])]

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _base_state(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "val_keys": self.val_keys, "val_y": self.val_y, "seen": self.seen,
                "n_merged": self.n_merged,
                "adapter": {} if self.adapter is None else self.adapter.state_dict()}

    def _load_base(self, state: dict[str, Any]) -> None:
        self.theta0 = dict(state["theta0"])
        self.val_keys, self.val_y = list(state["val_keys"]), list(state["val_y"])
        self.seen, self.n_merged = state["seen"], int(state["n_merged"])
        if self.adapter is None and state["adapter"]:
            w = state["adapter"]["down.weight"]
            self.adapter = Adapter(w.shape[1], w.shape[0]).to(w.device)
        if self.adapter is not None and state["adapter"]:
            self.adapter.load_state_dict(state["adapter"])

    def _base_memory(self) -> tuple[int, int]:
        n_val = sum(len(k) for k in self.val_keys)
        return n_val, tensor_bytes(*self.val_keys, *self.theta0.values())


class TaskArithmeticPlugin(MergingPlugin):
    method = "task_arithmetic"

    def __init__(self, adapter: int, head_scale: float, val_fraction: float, lam: float | None,
                 grid: list[float], finetune_over: str = "task", lambda_on: str = "class_il") -> None:
        super().__init__(adapter, head_scale, val_fraction, finetune_over)
        self.lam, self.grid, self.lambda_on = lam, grid, lambda_on
        self.taus: list[Params] = []
        self.lams: list[float] = []

    def add_task(self, learner, exp, tau, theta) -> None:
        self.taus.append(tau)

    def combine(self, lam: float) -> Params:
        body = {k: self.theta0[k] + lam * sum(t[k] for t in self.taus) for k in self._body_names()}
        return {**body, **self._heads(self.taus)}

    def merged(self, learner) -> Params:
        lam = self.lam if self.lam is not None else self.pick_lambda(learner, self.grid, self.combine)
        self.lams.append(lam)
        return self.combine(lam)

    def report(self, learner, stream) -> dict[str, Any]:
        return {f"{self.method}_lambda": self.lams}

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "taus": self.taus, "lams": self.lams}

    def load_state_dict(self, state) -> None:
        self._load_base(state)
        self.taus, self.lams = list(state["taus"]), list(state["lams"])

    def memory_usage(self) -> tuple[int, int]:
        items, nbytes = self._base_memory()
        return items + len(self.taus), nbytes + sum(tensor_bytes(*t.values()) for t in self.taus)


class TiesPlugin(TaskArithmeticPlugin):
    method = "ties_merging"

    def __init__(self, adapter: int, head_scale: float, val_fraction: float, lam: float | None,
                 grid: list[float], keep: float, finetune_over: str = "task", lambda_on: str = "class_il") -> None:
        super().__init__(adapter, head_scale, val_fraction, lam, grid, finetune_over, lambda_on)
        self.keep = keep
        self._merged_body: Params = {}

    def merged(self, learner) -> Params:
        self._merged_body = {k: ties_merge([t[k] for t in self.taus], self.keep) for k in self._body_names()}
        return super().merged(learner)

    def combine(self, lam: float) -> Params:
        body = {k: self.theta0[k] + lam * v for k, v in self._merged_body.items()}
        return {**body, **self._heads(self.taus)}


class AdaMergingPlugin(TaskArithmeticPlugin):
    method = "adamerging"

    def __init__(self, adapter: int, head_scale: float, val_fraction: float, granularity: str, unlabeled: str,
                 entropy_over: str, init: float | str, steps: int, lr: float, batch_per_task: int,
                 finetune_over: str = "task", grid: list[float] = TA_GRID, select: str = "none",  # noqa: B006
                 lambda_on: str = "class_il") -> None:
        super().__init__(adapter, head_scale, val_fraction, None, list(grid), finetune_over, lambda_on)
        self.granularity, self.unlabeled, self.entropy_over = granularity, unlabeled, entropy_over
        self.init, self.steps, self.lr, self.batch_per_task = init, steps, lr, batch_per_task
        self.select = select
        self.coef_rows: list[dict[str, Any]] = []
        self.selected_steps: list[int] = []  # per merge: after how many entropy steps the kept coefficients were
        self.val_accs: list[dict[str, float]] = []  # select: validation: held-out accuracy at step 0 and kept

    def _unlabeled_pools(self, learner) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(unlabeled keys, mask of the classes their entropy is taken over) per experience so far."""
        stream = learner.stream
        exps = stream.experiences[: self.n_merged + 1]
        pools = []
        for j, e in enumerate(exps):
            keys = self.val_keys[j] if self.unlabeled == "validation" else stream.keys(e.test)
            if self.entropy_over == "task":
                mask = class_mask(stream.n_classes, e.classes, learner.device)
            else:
                mask = self.seen.to(learner.device, copy=True)
            if len(keys):
                pools.append((keys, mask))
        return pools

    def _combine_coefs(self, c: torch.Tensor, names: list[str], heads: Params) -> Params:
        """theta_0 + sum_j c[j, layer] * tau_j per body tensor (one column: the same coefficient for every layer)."""
        out = dict(heads)
        for i, k in enumerate(names):
            coef = c[:, i if c.shape[1] > 1 else 0]
            out[k] = self.theta0[k] + sum(coef[j] * t[k] for j, t in enumerate(self.taus))
        return out

    def merged(self, learner) -> Params:
        names = self._body_names()
        n_coef = len(names) if self.granularity == "layer" else 1
        if self.init == "task_arithmetic":  # start where task arithmetic's held-out pick is
            self.lams.append(self.pick_lambda(learner, self.grid, self.combine))
        start = self.lams[-1] if self.init == "task_arithmetic" else float(self.init)
        lam = torch.full((len(self.taus), n_coef), start, device=learner.device, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=self.lr)
        pools = self._unlabeled_pools(learner)
        heads = self._heads(self.taus)
        gen = torch.Generator().manual_seed(learner.seed * 1_000_003 + self.n_merged)
        every = max(1, self.steps // 10)
        best, best_step, best_acc, first_acc = lam.detach().clamp(0.0, 1.0), 0, -1.0, -1.0
        for step in range(self.steps + 1):
            if self.select == "validation" and (step % every == 0 or step == self.steps):
                c = lam.detach().clamp(0.0, 1.0)
                acc = self.val_accuracy(learner, self._combine_coefs(c, names, heads))
                first_acc = acc if step == 0 else first_acc
                if acc > best_acc:  # the earliest of equals: the fewest entropy steps
                    best, best_step, best_acc = c.clone(), step, acc
            if step == self.steps:
                break
            self.net.eval()  # dropout off, as at test time
            picks = [p[torch.randint(len(p), (min(self.batch_per_task, len(p)),), generator=gen)] for p, _ in pools]
            keys = torch.cat(picks)
            x = learner.fetch(keys)
            params = self._combine_coefs(lam.clamp(0.0, 1.0), names, heads)
            with sample_keys(keys, learner.stream):
                logits = functional_call(self.net, params, (x,))
            # per task: the entropy of its inputs' predictions over its own classes (the paper's per-task heads),
            # or over all classes seen so far (entropy_over: seen), summed over the tasks
            entropy, start = 0.0, 0
            for pick, (_, mask) in zip(picks, pools, strict=True):
                z = logits[start : start + len(pick)].masked_fill(~mask, MASKED_LOGIT)
                start += len(pick)
                entropy = entropy - (z.softmax(1) * z.log_softmax(1)).sum(1).mean()
            opt.zero_grad()
            entropy.backward()
            opt.step()
        self.net.train()
        c = (best if self.select == "validation" else lam.detach().clamp(0.0, 1.0)).cpu()
        self.selected_steps.append(best_step if self.select == "validation" else self.steps)
        if self.select == "validation":
            self.val_accs.append({"merged_after": self.n_merged, "initial": first_acc, "kept": best_acc})
        layers = names if n_coef > 1 else ["all"]
        for j in range(len(self.taus)):
            for i, layer in enumerate(layers):
                self.coef_rows.append({"merged_after": self.n_merged, "task": j, "layer": layer,
                                       "coefficient": float(c[j, i])})
        return self._combine_coefs(c.to(learner.device), names, heads)

    def report(self, learner, stream) -> dict[str, Any]:
        init = {"adamerging_init_lambda": self.lams} if self.init == "task_arithmetic" else {}
        return {"adamerging_unlabeled": self.unlabeled, "adamerging_coefficients": self.coef_rows,
                "adamerging_steps_kept": self.selected_steps, "adamerging_held_out_accuracy": self.val_accs, **init}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "coef_rows": self.coef_rows, "selected_steps": self.selected_steps,
                "val_accs": self.val_accs}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.coef_rows = list(state["coef_rows"])
        self.selected_steps = list(state.get("selected_steps", []))
        self.val_accs = list(state.get("val_accs", []))


class MagMaxPlugin(MergingPlugin):
    method = "magmax"
    sequential = True

    def __init__(self, adapter: int, head_scale: float, val_fraction: float, lam: float,
                 finetune_over: str = "task") -> None:
        super().__init__(adapter, head_scale, val_fraction, finetune_over)
        self.lam = lam
        self.running: Params = {}  # max-magnitude merge of the body task vectors so far
        self.finetuned: Params = {}  # the weights the next experience starts from

    def start_weights(self) -> Params:
        return self.finetuned or self.theta0

    def add_task(self, learner, exp, tau, theta) -> None:
        self.finetuned = theta
        body = self._body_names()
        self.running = {k: tau[k] if k not in self.running else max_magnitude(self.running[k], tau[k])
                        for k in body}

    def merged(self, learner) -> Params:
        out = {k: self.theta0[k] + self.lam * v for k, v in self.running.items()}
        for k in ("model.head.weight", "model.head.bias"):
            if k in self.finetuned:  # every class keeps the row its experience fine-tuned
                out[k] = self.finetuned[k]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "running": self.running, "finetuned": self.finetuned}

    def load_state_dict(self, state) -> None:
        self._load_base(state)
        self.running, self.finetuned = dict(state["running"]), dict(state["finetuned"])

    def memory_usage(self) -> tuple[int, int]:
        items, nbytes = self._base_memory()
        stored = int(bool(self.running)) + int(bool(self.finetuned))
        return items + stored, nbytes + tensor_bytes(*self.running.values(), *self.finetuned.values())


# the parameters every merging strategy shares
AdapterWidth = Annotated[int, Min(0, why="0: no adapter; e.g. 64")]  # bottleneck width of the residual adapter
ValFraction = Annotated[float, Interval(0, 1, high_open=True)]  # held-out share of each experience
LambdaOn = Literal["class_il", "task_il"]  # the held-out accuracy a picked lambda maximises
# classes of the fine-tuning cross-entropy: the experience's own, or also every class seen before (fixed rows)
FinetuneOver = Literal["task", "seen"]
# the fixed cosine head's rows: each experience's class means under theta_0, or seeded orthonormal rows for every class
HeadInit = Literal["class_mean", "orthogonal"]


def _with_head(plugin: MergingPlugin, head_init: str) -> list[Plugin]:
    plugin.head_init = head_init
    return [plugin]


def _check_lam(lam: float | None, val_fraction: float, grid: list[float], lambda_on: str) -> None:
    if lam is not None and lambda_on != "class_il":
        raise ConfigError(f"strategy.lambda_on: {lambda_on} only says how lambda is picked on held-out data, and lam "
                          f"is fixed at {lam}; set lam: null to pick it, or drop lambda_on")
    if lam is None and val_fraction == 0:
        raise ConfigError("strategy.lam: null picks lambda on held-out data, but val_fraction is 0; "
                          "set val_fraction: 0.1 or a fixed lam")
    if lam is None and not grid:
        raise ConfigError("strategy.grid: empty; give the lambda values to try, e.g. [0.5, 1.0]")


@register_strategy("task_arithmetic", test_params=TEST_SETTINGS)
def task_arithmetic(lam: float | None = None, grid: list[float] = TA_GRID,  # noqa: B006
                    adapter: AdapterWidth = 0, head_scale: Positive = 16.0, val_fraction: ValFraction = 0.1,
                    finetune_over: FinetuneOver = "task", lambda_on: LambdaOn = "class_il",
                    head_init: HeadInit = "class_mean") -> list[Plugin]:
    """Task arithmetic (Ilharco et al. 2023): theta_0 + lam * sum of task vectors, lam picked on held-out data
    from ``grid`` (null) or fixed. ``adapter``: bottleneck width of a residual adapter on the features (0: none).
    ``lambda_on``: the held-out accuracy lam maximises, class-IL or task-aware (the papers' per-task heads).
    ``head_init`` (every merging strategy): the fixed head's rows, class means or seeded orthonormal vectors."""
    _check_lam(lam, val_fraction, grid, lambda_on)
    return _with_head(TaskArithmeticPlugin(adapter, head_scale, val_fraction, lam, list(grid), finetune_over,
                                           lambda_on), head_init)


@register_strategy("ties_merging", test_params=TEST_SETTINGS)
def ties_merging(keep: Annotated[float, Interval(0, 1, low_open=True)] = 0.2, lam: float | None = 1.0,
                 grid: list[float] = TIES_GRID,  # noqa: B006
                 adapter: AdapterWidth = 0, head_scale: Positive = 16.0, val_fraction: ValFraction = 0.1,
                 finetune_over: FinetuneOver = "task", lambda_on: LambdaOn = "class_il",
                 head_init: HeadInit = "class_mean") -> list[Plugin]:
    """TIES-Merging (Yadav et al. 2023): trim to the top ``keep`` fraction of magnitudes, elect signs, disjoint
    mean, scaled by ``lam`` (null: picked on held-out data from ``grid``)."""
    _check_lam(lam, val_fraction, grid, lambda_on)
    return _with_head(TiesPlugin(adapter, head_scale, val_fraction, lam, list(grid), keep, finetune_over, lambda_on),
                      head_init)


@register_strategy("adamerging", test_params={**TEST_SETTINGS, "steps": 20})
def adamerging(granularity: Literal["layer", "task"] = "layer", unlabeled: Literal["test", "validation"] = "test",
               entropy_over: Literal["task", "seen"] = "task", init: float | Literal["task_arithmetic"] = 0.3,
               steps: PositiveInt = 500, lr: Positive = 0.001, batch_per_task: PositiveInt = 16,
               adapter: AdapterWidth = 0, head_scale: Positive = 16.0, val_fraction: ValFraction = 0.1,
               finetune_over: FinetuneOver = "task", grid: list[float] = TA_GRID,  # noqa: B006
               select: Literal["none", "validation"] = "none", lambda_on: LambdaOn = "class_il",
               head_init: HeadInit = "class_mean") -> list[Plugin]:
    """AdaMerging (Yang et al. 2024): per-task (and per-layer) merging coefficients learned by entropy
    minimisation. ``unlabeled: test`` adapts on the unlabeled test inputs of the experiences seen so far
    (test-time adaptation, as the paper does); ``validation`` on the held-out training split, labels unused.
    ``entropy_over: task``: each experience's inputs are scored over its own classes, as the paper scores each
    task with its own head (which experience an unlabeled input came from is used, never its label);
    ``seen``: over every class seen so far. ``init: task_arithmetic`` starts from the lambda task arithmetic picks
    on the held-out split; ``select: validation`` keeps, of the coefficients saved every steps/10, those with the
    best held-out class-IL accuracy (a class-IL variant, not the paper's). ``lambda_on: task_il`` makes both score
    the task-aware held-out accuracy instead (the papers' multi-task evaluation)."""
    if unlabeled == "validation" and val_fraction == 0:
        raise ConfigError("strategy.unlabeled: validation needs held-out data; set val_fraction > 0 or use test")
    if (init == "task_arithmetic" or select == "validation") and val_fraction == 0:
        raise ConfigError("strategy.val_fraction: init task_arithmetic and select validation need held-out data; "
                          "set val_fraction: 0.1 (or init: 0.3 and select: none)")
    if lambda_on != "class_il" and init != "task_arithmetic" and select != "validation":
        raise ConfigError(f"strategy.lambda_on: {lambda_on} scores the held-out data that init: task_arithmetic and "
                          "select: validation use, and neither is set; set one of them, or drop lambda_on")
    return _with_head(AdaMergingPlugin(adapter, head_scale, val_fraction, granularity, unlabeled, entropy_over, init,
                                       steps, lr, batch_per_task, finetune_over, list(grid), select, lambda_on),
                      head_init)


@register_strategy("magmax", test_params=TEST_SETTINGS)
def magmax(lam: float = 0.5, adapter: AdapterWidth = 0, head_scale: Positive = 16.0, val_fraction: ValFraction = 0.0,
           finetune_over: FinetuneOver = "task", head_init: HeadInit = "class_mean") -> list[Plugin]:
    """MagMax (Marczak et al. 2024): sequential fine-tuning, max-magnitude merge of the task vectors kept as one
    running vector; the evaluated model is theta_0 + ``lam`` * merged vector."""
    return _with_head(MagMaxPlugin(adapter, head_scale, val_fraction, lam, finetune_over), head_init)
