"""Corrections of the classifier's bias towards new classes: WA (weight aligning) and BiC (bias correction).

With a small exemplar memory, each experience trains on many samples of its new classes and few of the old
ones, and the output layer ends up favouring the new classes: old-class test samples are predicted as new
classes. Both methods train as iCaRL-style exemplar methods (the experience's data plus a class-balanced
memory, see ``strategies/exemplar.py``) with knowledge distillation from the previous model, then correct
the output layer after each experience.

WA: Zhao, Xiao, Gan, Zhang and Xia 2020, "Maintaining Discrimination and Fairness in Class Incremental
Learning" (CVPR).

* Loss (their Sec. 3.2, following BiC): (1 - lambda) CE + lambda KD, lambda = n_old / (n_old + n_new) classes;
  KD is the distillation of the previous model's softened outputs (temperature T = 2) over the old classes.
* Weight clipping: after every optimisation step the output layer's weights are clipped to be non-negative,
  so that, with non-negative (ReLU) features, a class's weight norm measures how large its logits are.
* Weight aligning, after each experience: the new classes' weight vectors are multiplied by
  gamma = mean ||w_old|| / mean ||w_new||, so new and old weight vectors have the same mean norm.
* The paper's output layer is o(x) = W^T phi(x), without a bias, so the weight norms carry the whole
  imbalance. The toolbox's heads have a bias: WA holds it at zero (set before training and after every step;
  ``head_bias: true`` keeps it trainable, and then scales the new classes' bias by gamma too, which leaves the
  imbalance the bias learnt uncorrected: on Split-MNIST-5k gamma then stays near 1 and the gap stays).
* The softmax runs over the classes seen so far (``mask_unseen``, the paper's layer grows with the classes);
  over all outputs, CE pushes future classes' rows down and clipping zeroes them before they are trained
  (Split-MNIST-5k, 1 epoch, 3 seeds: ACC 0.792 with the mask, 0.742 without).
* Where WA cannot close the gap (measured by ``experiments/wa_diagnose.py``): with one epoch of SGD at batch 10
  the new rows' norms hardly outgrow the old ones (gamma 0.96-1.01 at the last step), yet scaling the last
  task's rows by a further ~0.85-0.9 would balance old and new accuracy: the bias sits in how the adapted
  features align with the new rows, not in their norms. With 5 epochs the norms diverge (gamma ~0.9) and WA
  narrows the gap below ER's at the same ACC (``exemplar_check.py --epochs 5``).

BiC: Wu, Chen, Wang, Ye, Liu, Guo and Fu 2019, "Large Scale Incremental Learning" (CVPR).

* The exemplars of each old class are split into a training and a validation part (9:1 in the paper,
  ``val_fraction = 0.1``); from the new classes, as many samples per class as an old class has in validation
  are held out. Stage 1 trains on the training parts with lambda KD + (1 - lambda) CE (Eq. 3, lambda as above,
  T = 2, the previous model's corrected outputs as targets).
* Stage 2 (their Eq. 4): a bias correction layer with two parameters, q_k = alpha o_k + beta for the new
  classes' logits (old classes' logits pass unchanged), fitted by cross-entropy over the classes seen so far
  on the balanced validation set only, with the rest of the model frozen. Each experience's (alpha, beta) stay
  applied to its classes afterwards, in training and at test.
  Deviation: the paper fits (alpha, beta) by SGD for a fixed number of epochs from (1, 0); the logits are fixed
  while it is fitted and the loss is convex in (alpha, beta), so we compute the validation logits once and run
  L-BFGS on them (``bias_steps`` iterations, milliseconds) with a ridge ``bias_l2 * ((alpha - 1)^2 + beta^2)``
  in place of the paper's implicit early stopping: a validation set that some (alpha, beta) classifies
  perfectly (small ones do) has no finite minimiser, and without the ridge the fitted layer ran off to
  alpha = 17, beta = -44 on a toy stream and wrecked every later experience. bias_l2 = 0.01 was chosen
  among {0, 0.001, 0.01} on Split-MNIST-5k (class-IL ACC 0.846 / 0.878 / 0.882, 3 seeds).
* Which exemplars are for validation is decided by each exemplar's rank in its class's memory order
  (the herding order, or a random priority order with ``selection: random``; a class's memory keeps the head of
  that order): every ``1/val_fraction``-th rank, so when a
  class gives up exemplars its remaining validation samples stay validation samples. While the memory holds
  too few exemplars a class for any to be set aside (fewer than ``1/val_fraction``), there is no balanced
  validation set and stage 2 is skipped.

Exemplars: iCaRL's herding, as both papers (``selection: random`` takes a uniform random sample per class).
Defaults: memory 500
(the toolbox's Split-MNIST budget; the papers use 2,000 on CIFAR-100 and 20,000 on ImageNet), T = 2 (both
papers).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from cltoolbox.params import Interval, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.distillation import distillation_loss
from cltoolbox.strategies.exemplar import ExemplarPlugin


def kd_on(new: torch.Tensor, old: torch.Tensor, classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation of ``old`` into ``new`` logits over the columns ``classes`` (KL of softened softmaxes)."""
    return distillation_loss(new.index_select(1, classes), old.index_select(1, classes), temperature)


def ce_with_kd(plugin: ExemplarPlugin, learner, batch: Batch, logits: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """WA's and BiC's training loss: (1 - lam) CE + lam KD on the old classes, lam = n_old / n_seen."""
    ce = F.cross_entropy(logits, batch.y)
    lam = plugin.kd_weight()
    if lam == 0:
        return ce
    old = plugin.teacher_logits(learner, learner.model_input(batch.x), batch.t)
    return (1 - lam) * ce + lam * kd_on(logits, old, plugin.old_classes, temperature)


# -- WA ------------------------------------------------------------------------------------------------------
class WAPlugin(ExemplarPlugin):
    name = "wa"
    # DDP: CE and KD are per-row means on the shard; clipping and aligning change the head alike on every rank
    supports_ddp = True

    def __init__(self, memory_size: int, temperature: float, clip: bool, align: bool, head_bias: bool,
                 selection: str = "herding", mask_unseen: bool = True) -> None:
        super().__init__(memory_size, selection)
        self.temperature, self.clip, self.align, self.head_bias = temperature, clip, align, head_bias
        self.mask_unseen = mask_unseen
        self.gammas: list[float] = []  # the aligning factor of each experience (metrics.json diagnostics)
        self._unseen: torch.Tensor | None = None  # bool over classes: not met yet (no output in the paper's layer)

    def before_experience(self, learner, exp) -> None:
        super().before_experience(learner, exp)
        self._unseen = ~self.seen_mask(learner.stream.n_classes, learner.device)

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        if self.mask_unseen and self._unseen is not None:
            logits = logits.masked_fill(self._unseen, MASKED_LOGIT)
        return ce_with_kd(self, learner, batch, logits, self.temperature)

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        self._constrain(learner.model.head)

    def after_step(self, learner, batch: Batch) -> None:
        self._constrain(learner.model.head)

    def _constrain(self, head: torch.nn.Linear) -> None:
        with torch.no_grad():
            if self.clip:
                head.weight.clamp_(min=0)
            if not self.head_bias and head.bias is not None:
                head.bias.zero_()

    def after_experience(self, learner, exp) -> None:
        if self.align and self.old_classes is not None:
            self.gammas.append(align_weights(learner.model.head, self.old_classes, self.current_classes))
        super().after_experience(learner, exp)

    def report(self, learner, stream) -> dict[str, float]:
        return {f"wa_gamma_{i}": g for i, g in enumerate(self.gammas)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gammas": list(self.gammas)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gammas = [float(g) for g in state["gammas"]]


def align_weights(head: torch.nn.Linear, old: torch.Tensor, new: torch.Tensor) -> float:
    """Scale the rows ``new`` of ``head`` (weights and bias) so their mean weight norm equals the rows ``old``'s;
    returns the factor gamma."""
    with torch.no_grad():
        norms = head.weight.norm(dim=1)
        gamma = float(norms[old].mean() / norms[new].mean().clamp_min(1e-12))
        head.weight[new] *= gamma
        if head.bias is not None:
            head.bias[new] *= gamma
    return gamma


@register_strategy("wa")
def wa(memory_size: PositiveInt = 500, temperature: Positive = 2.0, clip: bool = True, align: bool = True,
       head_bias: bool = False, selection: Literal["herding", "random"] = "herding",
       mask_unseen: bool = True) -> list[Plugin]:
    """WA (Zhao et al. 2020): exemplars + KD, weights clipped >= 0, new-class weights aligned to old norms.

    ``memory_size`` (>= 1): class-balanced exemplars; ``temperature`` (> 0): KD temperature (paper: 2);
    ``clip``/``align``: the paper's weight clipping and weight aligning (switch off for ablations);
    ``head_bias``: train the head's bias (the paper's layer has none; default: held at 0); ``selection``:
    exemplars by herding (the paper's) or at random; ``mask_unseen``: the softmax runs over the classes seen so
    far, as in the paper's growing layer (false: over all the head's outputs, which pushes future classes'
    rows to zero under clipping).
    """
    return [WAPlugin(memory_size, temperature, clip, align, head_bias, selection, mask_unseen)]


# -- BiC -----------------------------------------------------------------------------------------------------
class BiCPlugin(ExemplarPlugin):
    name = "bic"
    # DDP: stage 1 as WA's loss through the plugin's forward (gradients all-reduced by the loop); the validation
    # split (shared generator) and the stage-2 bias fit (a full pass) alike on every rank
    supports_ddp = True

    def __init__(self, memory_size: int, val_fraction: float, temperature: float, bias_steps: int,
                 selection: str = "herding", bias_l2: float = 0.01) -> None:
        super().__init__(memory_size, selection)
        self.val_fraction, self.temperature, self.bias_steps = val_fraction, temperature, bias_steps
        self.bias_l2 = bias_l2
        # the bias correction layers: logits * scale + shift, per class (1 and 0 until a class is corrected)
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.params: list[list[float]] = []  # (alpha, beta) fitted after each experience, for diagnostics
        self._val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this experience's (key, y, t)

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        if self.scale is None:  # a resumed run already holds its layers
            self.scale = torch.ones(stream.n_classes, device=learner.device)
            self.shift = torch.zeros(stream.n_classes, device=learner.device)
        self.scale, self.shift = self.scale.to(learner.device), self.shift.to(learner.device)

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.shift

    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.correct(self._teacher(x))

    # -- the validation split ---------------------------------------------------------------------------
    def memory_split(self) -> torch.Tensor:
        """Bool over the memory's entries: True for the validation part (see the module docstring)."""
        m = self.memory
        y, p = m.y[: m.size].cpu(), m.priority[: m.size]
        # rank of each entry within its class, by descending priority (the order ClassBalancedMemory keeps)
        order = torch.argsort(p, descending=True, stable=True)
        order = order[torch.argsort(y[order], stable=True)]
        rank = torch.empty(m.size, dtype=torch.long)
        counts = torch.bincount(y)
        starts = torch.cumsum(counts, 0) - counts
        rank[order] = torch.arange(m.size) - starts[y[order]]
        f = self.val_fraction
        is_val = torch.floor((rank + 1) * f) > torch.floor(rank * f)
        return is_val.to(m.y.device)

    def training_set(self, learner, exp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key, y = learner.stream.keys(exp.train), exp.y_train
        t = torch.full_like(y, exp.task_id)
        m = self.memory
        self._val = None
        if self.old_classes is None or m.size == 0:  # nothing to correct against: no validation split
            return key, y, t
        is_val = self.memory_split()
        mk, my, mt = m.key[: m.size], m.y[: m.size], m.t[: m.size]
        old_val = is_val & torch.isin(my, self.old_classes.to(my.device))
        if not bool(old_val.any()):  # too few exemplars a class for a validation part: no balanced set, no stage 2
            return super().training_set(learner, exp)
        n_per_class = max(1, round(int(old_val.sum()) / len(self.old_classes)))
        # hold out n_per_class random samples of each class of this experience
        held = torch.zeros(len(y), dtype=torch.bool)
        y_cpu = y.cpu()
        for c in self.current_classes.tolist():
            idx = torch.nonzero(y_cpu == c).flatten()
            pick = idx[torch.randperm(len(idx), generator=learner.generator)[: min(n_per_class, len(idx) - 1)]]
            held[pick] = True
        held = held.to(y.device)
        dev = key.device
        self._val = (torch.cat((mk[old_val].to(dev), key[held])), torch.cat((my[old_val].to(dev), y[held])),
                     torch.cat((mt[old_val].to(dev), t[held])))
        train_mem = ~old_val  # the current classes' own exemplars (recurring streams) train too
        return (torch.cat((key[~held], mk[train_mem].to(dev))), torch.cat((y[~held], my[train_mem].to(dev))),
                torch.cat((t[~held], mt[train_mem].to(dev))))

    # -- stage 1 --------------------------------------------------------------------------------------------
    def forward(self, learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.correct(learner.model(x))

    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.correct(learner.model(x))

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        # the teacher is the previous model with its correction layers (those of the old classes are unchanged)
        return ce_with_kd(self, learner, batch, logits, self.temperature)

    # -- stage 2 --------------------------------------------------------------------------------------------
    def after_experience(self, learner, exp) -> None:
        if self._val is not None:
            key, y, t = self._val
            allowed = self.seen_mask(learner.stream.n_classes, learner.device)  # the classes seen so far
            logits = validation_logits(learner, key, self.correct)
            t = t.to(logits.device)
            allowed = allowed & learner.task_mask[t] if learner.multi_head else allowed.expand_as(logits)
            alpha, beta = fit_bias_layer(logits, y.to(logits.device), self.current_classes, allowed,
                                         self.bias_steps, self.bias_l2)
            cur = self.current_classes
            self.scale[cur] *= alpha
            self.shift[cur] = alpha * self.shift[cur] + beta
            self.params.append([alpha, beta])
            self._val = None
        super().after_experience(learner, exp)

    def report(self, learner, stream) -> dict[str, float]:
        out = {}
        for i, (a, b) in enumerate(self.params):
            out[f"bic_alpha_{i}"], out[f"bic_beta_{i}"] = a, b
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scale": self.scale, "shift": self.shift,
                "params": [list(p) for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scale, self.shift = state["scale"], state["shift"]
        self.params = [[float(a), float(b)] for a, b in state["params"]]

    def memory_usage(self) -> tuple[int, int]:
        items, nbytes = super().memory_usage()
        return items, nbytes + tensor_bytes(self.scale, self.shift)


def validation_logits(learner, key: torch.Tensor, correct) -> torch.Tensor:
    """The (frozen) model's corrected logits of the stream samples ``key``, in eval mode."""
    model = learner.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([correct(model(x)) for _, x in learner.batches(key)])
    model.train(was_training)
    return out


def fit_bias_layer(logits: torch.Tensor, y: torch.Tensor, new: torch.Tensor, allowed: torch.Tensor,
                   steps: int, l2: float = 0.0) -> tuple[float, float]:
    """(alpha, beta) minimising the cross-entropy of ``logits`` with the columns ``new`` replaced by
    alpha * logit + beta (BiC's stage 2), from alpha = 1, beta = 0. ``allowed`` (bool, like ``logits``): the
    classes each row competes among (those seen so far; on multi-head streams, of its task). ``l2`` adds
    l2 * ((alpha - 1)^2 + beta^2): without it a validation set that some (alpha, beta) separates has no finite
    minimiser, and L-BFGS runs off to extreme corrections."""
    params = torch.tensor([1.0, 0.0], dtype=logits.dtype, device=logits.device, requires_grad=True)
    is_new = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    is_new[new] = True
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        q = torch.where(is_new, params[0] * logits + params[1], logits).masked_fill(~allowed, MASKED_LOGIT)
        loss = F.cross_entropy(q, y) + l2 * ((params[0] - 1) ** 2 + params[1] ** 2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    alpha, beta = params.detach().tolist()
    return alpha, beta


@register_strategy("bic")
def bic(memory_size: PositiveInt = 500, val_fraction: Annotated[float, Interval(0, 1, True, True)] = 0.1,
        temperature: Positive = 2.0, bias_steps: PositiveInt = 100, bias_l2: NonNegative = 0.01,
        selection: Literal["herding", "random"] = "herding") -> list[Plugin]:
    """BiC (Wu et al. 2019): exemplars + KD, then a 2-parameter bias layer on the new classes' logits fitted on
    a balanced validation split of the memory.

    ``memory_size`` (>= 1); ``val_fraction`` in (0, 1): the exemplars held out for stage 2 (paper: 0.1, a 9:1
    split); ``temperature`` (> 0): KD temperature (paper: 2); ``bias_steps`` (>= 1): L-BFGS iterations of
    stage 2; ``bias_l2`` (>= 0): ridge pulling (alpha, beta) towards (1, 0) in stage 2; ``selection``: exemplars
    by herding (the paper's) or at random.
    """
    return [BiCPlugin(memory_size, val_fraction, temperature, bias_steps, selection, bias_l2)]
