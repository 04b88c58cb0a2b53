"""Model Zoo: a growing ensemble of small models, and its Isolated baseline.

Ramesh & Chaudhari 2022, "Model Zoo: A Growing Brain That Learns Continually" (ICLR; arXiv 2106.03027;
authors' code github.com/grasp-lyrl/modelzoo_continual). Tasks compete for the capacity of one model, so the
capacity is split: every episode (experience) adds one freshly initialised small model that is trained on the
current task plus up to ``b - 1`` past tasks, picked as in boosting: past tasks are sampled without replacement
with probability increasing in the current zoo's training loss on them. A task's prediction averages the
probabilities (softmax over the task's classes) of the members that were trained on it, with equal weights
(paper, Fig. 3: at test time every model trained on a task predicts it; the default ``weighting``).

Defaults and formulas from the authors' code (``modelzoo.py``, ``datasets/mnist.py``, ``modelzoo_minimal.ipynb``):

* ``tasks_per_model`` (b) = 5, the code's ``--tasks_per_round`` default (also the minimal notebook's ``bb``);
  a member gets min(b, tasks seen) tasks, always including the current one.
* Sampling weights (authors' ``sample_task``/``update_wts``): with l_k the zoo's loss (NLL of the averaged
  probabilities) on past task k and m their mean, w_k = clip(exp((l_k - m) / m), 1e-4, 1000), normalised.
  The mean is over the past tasks, as in the notebook (the repository's script also averages in the uniform
  loss of tasks not seen yet, which a continual learner cannot know).
* ``replay_fraction`` = 1.0 (the code's ``--replay_frac`` default): the fraction of a chosen past task's
  available samples a member is trained on. When replay is scarce the code repeats the replayed samples
  max(1, int(1 / ((k - 1) r))) times (k tasks in the member, r the replayed fraction of a task) so that they
  weigh about as much as the current task: done here with r = replayed / current-task samples.
* Members are multi-head (the loop masks logits to each sample's task when the stream has task labels); the
  paper's members are small (the notebook's is a 0.1M-parameter conv net); here the configured ``model``.

Where this toolbox differs:

* The authors replay all of a chosen task's data (or a fixed fraction). Here past data comes from a class-balanced
  replay memory of ``memory_size`` samples (the one ER's ``class_balanced`` policy uses), so Model Zoo can be
  compared with ER at the same budget; the zoo's training loss on a past task is measured on its samples in
  memory, the only ones kept.
* Averaging the members of a task: the default ``weighting = "uniform"`` is the paper's rule, the plain mean
  of the members that were trained on the task. The authors' code differs: it gives the first member of a
  task (trained on all its data) weight 1 / replay_frac and each later, replay-trained member weight 1 (equal
  weights only at its default full replay). ``weighting = "samples"`` generalises that code to a replay
  memory: each member's probabilities for a task are weighted by the number of the task's distinct samples
  it trained on, so with memory 500 on Split-MNIST-5k the first member of a task counts 1.6-6.4x more than
  each later one (its 800 samples against the 500 down to 125 of them left in the memory).
* The zoo's "tasks" are the stream's task ids; on streams with a single task id (class-incremental) they are
  the experiences, so class groups play the role of tasks.

Inference (``predict``): logits over all classes, in float64. For a class c of a seen task T,
``logit[c] = log q(T|x) + log p_T(c|x)``, where p_T is Model Zoo's task prediction (the weighted average over
the members trained on T of their softmax over T's classes) and q(T|x) is a task posterior, a linear pool of
the members' opinions over the K tasks seen: a member trained on the tasks S puts the prior mass |S| / K on
them, split by its softmax (over all classes of S) mass on each task's classes, and the prior 1 / K on every
task it never saw, so a member that cannot tell two tasks apart does not favour either. The task-IL
evaluation (mask to T's classes, argmax) sees log p_T plus a per-task constant, so it is exactly Model Zoo's
task-IL prediction; float64 keeps the added constant from rounding two scores into a tie. Class-IL takes the
argmax of the joint q(T|x) p_T(c|x): meaningful when the members were trained without task masks
(class-incremental streams, where a member trained on several experiences compares their classes; measured
class-IL ACC 0.81 on Split-MNIST-5k, MLP 2x100, 1 epoch, memory 500, 3 seeds; ER 0.82, naive 0.20); on task-IL
streams the members' cross-task scores are uncalibrated, and for ``isolated`` q is uniform, so class-IL picks
the most confident task-conditional prediction. When classes recur across tasks (domain-incremental streams)
the logit is log sum_T q(T|x) p_T(c|x), and q is uniform: without task ids at test time the zoo averages the
task experts, which is not what it is for (below naive on tiny permuted/rotated digits streams). Classes of
tasks not seen yet get -1e9. Before the first member exists the model's own logits are used.

``isolated``: the paper's baseline, one member per task trained only on that task (b = 1, no memory); a task
is predicted by its own member (by the average of its members when a task recurs).

Checkpoints: the newest member is ``learner.model`` itself (re-initialised in place for every experience, so
the checkpoint's model is the last member); the plugin's state holds the earlier members' state dicts, the
replay memory and the bookkeeping (tasks of each member, their weights).
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.models.cache import sample_keys
from cltoolbox.params import Interval, Min, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Plugin, tensor_bytes
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.gdumb import reinitialise
from cltoolbox.strategies.memory import ClassBalancedMemory


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one eval-mode forward of ``x`` (torch's FlopCounterMode: matmuls and convolutions); the model
    is left in training mode, no dropout is drawn and no normalisation statistics change."""
    from torch.utils.flop_counter import FlopCounterMode  # lazy: importing it pulls in triton (+80 MB RSS)

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train()
    return float(counter.get_total_flops())


def boosting_probabilities(losses: torch.Tensor) -> torch.Tensor:
    """Sampling probabilities of past tasks from the zoo's losses on them (authors' normalised-exp weights)."""
    losses = losses.double()
    mean = losses.mean().clamp_min(1e-12)
    w = torch.exp((losses - mean) / mean).clamp(1e-4, 1000.0)
    return w / w.sum()


class ModelZooPlugin(Plugin):
    """The zoo behind ``model_zoo`` and ``isolated`` (see the module docstring)."""

    def __init__(self, memory_size: int, tasks_per_model: int, replay_fraction: float, weighting: str) -> None:
        self.memory = ClassBalancedMemory(memory_size) if memory_size > 0 else None
        self.tasks_per_model = tasks_per_model
        self.replay_fraction = replay_fraction
        self.weighting = weighting
        # the zoo's tasks in order of arrival; a task's number indexes these lists
        self.task_keys: list[int] = []  # the stream's task id, or the experience index (see _by_experience)
        self.task_ids: list[int] = []  # stream task id, for the loop's multi-head masks
        self.task_classes: list[list[int]] = []
        # members in order of creation; the newest is learner.model, the others are frozen state dicts
        self.member_tasks: list[list[int]] = []  # first entry: the task of its experience
        self.member_weights: list[list[float]] = []
        self.frozen: list[dict[str, torch.Tensor]] = []
        self.params_per_member = 0
        self.flops_per_member = 0.0
        self._by_experience = False
        self._current = -1
        self._modules: list[nn.Module] = []  # eval-mode copies of self.frozen, built lazily
        self._cols: dict[tuple[int, str], torch.Tensor] = {}

    # -- bookkeeping -----------------------------------------------------------------------------------
    def before_fit(self, learner, stream) -> None:
        # one task id for the whole stream (class-incremental): the experiences are the tasks
        self._by_experience = not stream.task_labels and stream.n_tasks == 1
        if self.memory is not None:
            self.memory.item_bytes = stream.sample_bytes()

    def _task_of(self, exp) -> int:
        key = exp.index if self._by_experience else exp.task_id
        if key in self.task_keys:
            k = self.task_keys.index(key)
            new = sorted(set(self.task_classes[k]) | {int(c) for c in exp.classes})
            if new != self.task_classes[k]:
                self.task_classes[k] = new
                self._cols.clear()
            return k
        self.task_keys.append(int(key))
        self.task_ids.append(int(exp.task_id))
        self.task_classes.append(sorted(int(c) for c in exp.classes))
        self._cols.clear()
        return len(self.task_keys) - 1

    def _classes(self, task: int, device: torch.device) -> torch.Tensor:
        key = (task, str(device))
        if key not in self._cols:
            self._cols[key] = torch.tensor(self.task_classes[task], dtype=torch.long, device=device)
        return self._cols[key]

    def _frozen_modules(self, learner) -> list[nn.Module]:
        with torch.inference_mode(False):  # may be first called during evaluation: build ordinary tensors
            while len(self._modules) < len(self.frozen):
                module = copy.deepcopy(learner.model)
                module.load_state_dict(self.frozen[len(self._modules)])
                self._modules.append(module.eval().requires_grad_(False))
        return self._modules

    def members(self, learner) -> list[nn.Module]:
        """Every member, oldest first; the newest is ``learner.model``."""
        return [*self._frozen_modules(learner), learner.model] if self.member_tasks else []

    # -- training --------------------------------------------------------------------------------------
    def train_experience(self, learner, exp) -> bool:
        task = self._current = self._task_of(exp)
        if self.member_tasks:  # learner.model holds the previous member: keep a frozen copy
            self.frozen.append({k: v.detach().clone() for k, v in learner.model.state_dict().items()})
        past, _ = self.select_past_tasks(learner, task)
        n_cur = exp.n_train
        keys, ys, ts = [learner.stream.keys(exp.train)], [exp.y_train], [torch.full_like(exp.y_train, exp.task_id)]
        weights = [float(n_cur)]
        for k in past:
            idx = self._replay_indices(learner, k)
            weights.append(float(len(idx)))
            copies = max(1, int(n_cur / (len(past) * len(idx))))  # replay weighs about as much as the new task
            idx = idx.repeat(copies)
            keys.append(self.memory.key[idx])
            ys.append(self.memory.y[idx])
            ts.append(torch.full_like(ys[-1], self.task_ids[k]))
        if self.weighting == "uniform":
            weights = [1.0] * len(weights)
        seed = int(torch.randint(2**31 - 1, (1,), generator=learner.generator))
        reinitialise(learner.model, seed, learner.device)  # a fresh member, reproducible from the run's seed
        learner.train_data(torch.cat(keys), torch.cat(ys), torch.cat(ts))
        self.member_tasks.append([task, *past])
        self.member_weights.append(weights)
        return True

    def _memory_indices(self, task: int) -> torch.Tensor:
        n = self.memory.size
        return torch.nonzero(self.memory.t[:n] == task).flatten()

    def _replay_indices(self, learner, task: int) -> torch.Tensor:
        idx = self._memory_indices(task)
        if self.replay_fraction < 1.0:  # a fresh seeded subset for every member
            r = max(1, round(self.replay_fraction * len(idx)))
            idx = idx[torch.randperm(len(idx), generator=learner.generator)[:r].to(idx.device)]
        return idx

    def select_past_tasks(self, learner, task: int) -> tuple[list[int], list[float]]:
        """Past tasks for the next member (without ``task``), and the zoo's loss on each candidate.

        Candidates are the past tasks with samples in memory; b - 1 of them are sampled without replacement
        with :func:`boosting_probabilities` of the current zoo's loss (all of them when there are fewer).
        """
        if self.tasks_per_model == 1 or self.memory is None or self.memory.size == 0:
            return [], []
        candidates = [k for k in range(len(self.task_keys)) if k != task and len(self._memory_indices(k)) > 0]
        if not candidates:
            return [], []
        modules = self._frozen_modules(learner)
        losses = [self.zoo_loss(learner, modules, k) for k in candidates]
        n = min(self.tasks_per_model - 1, len(candidates))
        if n == len(candidates):
            return candidates, losses
        p = boosting_probabilities(torch.tensor(losses))
        pick = torch.multinomial(p, n, replacement=False, generator=learner.generator).tolist()
        return [candidates[i] for i in pick], losses

    @torch.no_grad()
    def zoo_loss(self, learner, modules: list[nn.Module], task: int) -> float:
        """NLL of the zoo's prediction for ``task`` on that task's samples in memory (fetched at once: the
        memory is small)."""
        idx = self._memory_indices(task)
        keys, y = self.memory.key[idx], self.memory.y[idx]
        with sample_keys(keys, learner.stream):
            log_p, _ = self.task_log_probs(modules, learner.fetch(keys), only=task)
        cols = self._classes(task, y.device)
        pos = torch.full((int(cols.max()) + 1,), -1, dtype=torch.long, device=y.device)
        pos[cols] = torch.arange(len(cols), device=y.device)
        return float(-log_p[task].gather(1, pos[y][:, None]).mean())

    def after_experience(self, learner, exp) -> None:
        if self.memory is not None:
            t = torch.full_like(exp.y_train, self._current)  # memory t = the zoo's task number
            self.memory.update(learner.stream.keys(exp.train), exp.y_train, t, learner.generator)
        if not self.params_per_member:  # every member has the configured architecture
            model = learner.model
            self.params_per_member = sum(p.numel() for p in model.parameters())
            self.flops_per_member = forward_flops(model, learner.fetch(learner.stream.keys(exp.train)[:1]))

    # -- inference -------------------------------------------------------------------------------------
    def task_log_probs(self, modules: list[nn.Module], x: torch.Tensor, only: int | None = None
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per seen task T: log p_T(c|x) over T's classes (B x |C_T|, float64) and log q(T|x) (B).

        p_T is the weighted mean of the softmax over T's classes of the members trained on T; q(T|x) is the
        mean over all members of their task posteriors (see the module docstring). ``only``: compute p for
        that task alone (q is then not valid).
        """
        dev = x.device
        n_tasks = len(self.task_keys)
        acc_p: dict[int, torch.Tensor] = {}
        acc_q: dict[int, torch.Tensor] = {}
        w_sum: dict[int, float] = {}
        for module, tasks, weights in zip(modules, self.member_tasks, self.member_weights, strict=True):
            if only is not None and only not in tasks:
                continue
            z = module(x).double()
            own = torch.zeros(z.shape[1], dtype=torch.bool, device=dev)
            for k in tasks:
                own[self._classes(k, dev)] = True
            log_pi = F.log_softmax(z.masked_fill(~own, float("-inf")), dim=1)
            log_s = torch.stack([torch.logsumexp(log_pi[:, self._classes(k, dev)], 1) for k in tasks])
            # the member's task posterior: its share of each of its tasks, scaled by the prior mass of its
            # tasks among all K seen (tasks it never saw keep their prior 1/K, added below)
            log_share = log_s - torch.logsumexp(log_s, 0) + math.log(len(tasks) / n_tasks)
            for i, (k, w) in enumerate(zip(tasks, weights, strict=True)):
                if only is not None and k != only:
                    continue
                term = math.log(w) + F.log_softmax(z[:, self._classes(k, dev)], dim=1)
                acc_p[k] = term if k not in acc_p else torch.logaddexp(acc_p[k], term)
                acc_q[k] = log_share[i] if k not in acc_q else torch.logaddexp(acc_q[k], log_share[i])
                w_sum[k] = w_sum.get(k, 0.0) + w
        n = len(modules)
        log_p = {k: v - math.log(w_sum[k]) for k, v in acc_p.items()}
        log_q = {}
        for k, v in acc_q.items():
            ignorant = sum(k not in tasks for tasks in self.member_tasks[:n])
            if ignorant:
                v = torch.logaddexp(v, torch.tensor(math.log(ignorant / n_tasks), dtype=v.dtype, device=dev))
            log_q[k] = v - math.log(n)
        return log_p, log_q

    def zoo_logits(self, modules: list[nn.Module], x: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Logits over all classes (float64): log sum_T q(T|x) p_T(c|x); -1e9 for classes of no seen task."""
        log_p, log_q = self.task_log_probs(modules, x)
        out = torch.full((x.shape[0], n_classes), float("-inf"), dtype=torch.float64, device=x.device)
        seen = torch.zeros(n_classes, dtype=torch.bool, device=x.device)
        for k, lp in log_p.items():
            cols = self._classes(k, x.device)
            out[:, cols] = torch.logaddexp(out[:, cols], log_q[k][:, None] + lp)
            seen[cols] = True
        return out.masked_fill(~seen, MASKED_LOGIT)

    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor | None:
        if not self.member_tasks:
            return None  # nothing trained yet: the (untrained) model's own logits
        return self.zoo_logits(self.members(learner), x, learner.stream.n_classes)

    # -- reporting and checkpoints ---------------------------------------------------------------------
    def _member_bytes(self) -> int:
        return sum(tensor_bytes(*sd.values()) for sd in self.frozen)

    def memory_usage(self) -> tuple[int, int]:
        items, nbytes = self.memory.usage() if self.memory is not None else (0, 0)
        return items, nbytes + self._member_bytes()  # replay samples, plus members besides learner.model

    def cost(self) -> dict[str, float]:
        n = len(self.member_tasks)
        per_task = [sum(k in tasks for tasks in self.member_tasks) for k in range(len(self.task_keys))]
        return {
            "zoo_members": float(n),
            "ensemble_params": float(n * self.params_per_member),
            "zoo_extra_member_bytes": float(self._member_bytes()),
            # predict runs every member on every sample (its logits cover the classes of all tasks);
            # FLOPs counted by torch's FlopCounterMode (matmuls/convolutions) on one forward per member
            "inference_forwards_per_sample": float(n),
            "inference_flops_per_sample": n * self.flops_per_member,
            # with the task id known, only the members trained on that task are needed (mean over tasks)
            "task_il_forwards_per_sample": sum(per_task) / len(per_task) if per_task else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "memory": self.memory.state_dict() if self.memory is not None else {},
            "task_keys": list(self.task_keys), "task_ids": list(self.task_ids),
            "task_classes": [list(c) for c in self.task_classes],
            "member_tasks": [list(t) for t in self.member_tasks],
            "member_weights": [list(w) for w in self.member_weights],
            "frozen": list(self.frozen),
            "params_per_member": self.params_per_member, "flops_per_member": self.flops_per_member,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self.task_keys = [int(k) for k in state["task_keys"]]
        self.task_ids = [int(k) for k in state["task_ids"]]
        self.task_classes = [[int(c) for c in cs] for cs in state["task_classes"]]
        self.member_tasks = [[int(k) for k in ts] for ts in state["member_tasks"]]
        self.member_weights = [[float(w) for w in ws] for ws in state["member_weights"]]
        self.frozen = list(state["frozen"])
        self.params_per_member = int(state["params_per_member"])
        self.flops_per_member = float(state["flops_per_member"])
        self._modules = []
        self._cols.clear()


@register_strategy("model_zoo")
def model_zoo(
    memory_size: Annotated[int, Min(1, why="strategy isolated trains without replay")] = 500,
    tasks_per_model: PositiveInt = 5,
    replay_fraction: Annotated[float, Interval(0, 1, low_open=True)] = 1.0,
    weighting: Literal["uniform", "samples"] = "uniform",
) -> list[Plugin]:
    """Model Zoo (Ramesh & Chaudhari 2022): grow one small model per experience, trained on boosting-picked tasks.

    ``memory_size``: class-balanced replay memory (samples), ER's budget; ``tasks_per_model`` (b): tasks per
    member including the current one (5, the authors' code); ``replay_fraction``: share of a chosen past
    task's stored samples each member replays (1.0, the authors' code); ``weighting``: how a task's members
    are averaged (``uniform``: the plain mean, the paper's rule; ``samples``: weighted by the task's samples
    each trained on, a generalisation of the authors' code, see the module docstring).
    """
    if weighting not in ("samples", "uniform"):  # configs check the Literal; this is for Python callers
        raise ConfigError(f"strategy.weighting: must be 'samples' or 'uniform', got {weighting!r}")
    return [ModelZooPlugin(memory_size, tasks_per_model, replay_fraction, weighting)]


@register_strategy("isolated")
def isolated() -> list[Plugin]:
    """Isolated (Model Zoo's baseline, Ramesh & Chaudhari 2022): a fresh model per task, trained on it alone."""
    return [ModelZooPlugin(memory_size=0, tasks_per_model=1, replay_fraction=1.0, weighting="uniform")]
