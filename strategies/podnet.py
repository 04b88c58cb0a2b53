"""PODNet: Pooled Outputs Distillation with a Local Similarity Classifier.

Douillard, Cord, Ollion, Robert and Valle 2020, "PODNet: Pooled Outputs Distillation for Small-Tasks
Incremental Learning" (ECCV). An exemplar method (the experience's data plus a class-balanced memory chosen by
herding, see ``strategies/exemplar.py``) with:

* Local similarity classifier (LSC, their Sec. 3.2): K proxies per class; a class's score is the softmax-weighted
  mean of its proxies' similarities to the embedding, y_c = sum_k softmax_k(s_ck) s_ck, where a similarity is
  minus the squared distance between the L2-normalised vectors, s = 2 cos - 2 (the "negative stable cosine
  distance" of the authors' CIFAR-100 configuration; with plain cosines the margin below is twice as wide and,
  on Split-MNIST-5k, the learnt scale collapsed towards 0).
* NCA loss with a margin (Eq. 7): [-log(exp(eta (y_true - delta)) / sum_{c != true} exp(eta y_c))]_+ with a
  learnt scale eta (initialised to 1, as in the authors' configuration) and margin delta. eta is learnt through
  its logarithm so that it stays positive.
* POD-spatial (Sec. 3.1): at the output of every stage of the backbone, the activations are sum-pooled along the
  width and along the height, concatenated, L2-normalised, and the Euclidean distance between the old and new
  model's pooled outputs is averaged over the stages; POD-flat: the same distance between the L2-normalised final
  embeddings. Both apply from the second experience on, weighted by lambda_spatial = 3 and lambda_flat = 1 times
  the adaptive factor sqrt(|C_old| / |C_new|) of LUCIR.
* New classes' proxies start at the k-means centroids (K clusters, 10 Lloyd iterations) of the class's
  normalised embeddings; in later steps the old classes' proxies stay fixed (``fix_old``).
* Class-balanced finetuning after each incremental step (``balanced_epochs``, ``balanced_lr``): the LSC alone
  (every proxy and eta) is trained on the exemplar memory, which holds as many samples of every class, with the
  backbone frozen. On Split-MNIST-5k (1 epoch, seed 0) it lifts class-IL ACC from 0.43 to 0.82.

Backbones: ``resnet18_reduced`` (stages = the outputs of its four resolution stages, pooled as above) and ``mlp``
(no spatial axes: the hidden layers' activations, which POD-spatial compares as whole vectors, normalised; the
embedding is the last hidden layer before its ReLU, so that it can be negative, as in LUCIR); other models are
refused before the run. Defaults from the authors' CIFAR-100 configuration (options/podnet/podnet_cnn_cifar100.yaml
in their repository): K = 10, delta = 0.6, lambda_spatial = 3, lambda_flat = 1, old proxies fixed, finetuning 20
epochs at lr 0.05. Deviations: the proxies and eta live in the plugin (the model's own ``head`` is left unused);
the reduced ResNet-18 keeps its last ReLU; predictions are the LSC's (the paper also reports an NME variant);
the adaptive factor is LUCIR's, as said above.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import MASKED_LOGIT, Batch, Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.exemplar import ExemplarPlugin


def staged_forward(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the outputs of each stage, the final embedding) of ``model`` for ``x`` (see the module docstring)."""
    if hasattr(model, "stages"):  # reduced ResNet-18: a resolution stage is two blocks
        out = F.relu(model.bn1(model.conv1(x)))
        stages = []
        for i, block in enumerate(model.stages):
            out = block(out)
            if i % 2 == 1:
                stages.append(out)
        return stages, F.adaptive_avg_pool2d(out, 1).flatten(1)
    stages, out, pre = [], x, x
    for m in model.body:  # MLP: every hidden activation; the embedding is the last one before its activation
        if isinstance(m, (nn.ReLU, nn.Tanh)):
            pre = out
        out = m(out)
        if isinstance(m, (nn.ReLU, nn.Tanh)):
            stages.append(out)
    return stages[:-1], pre


def embeddings(learner, keys: torch.Tensor) -> torch.Tensor:
    """The LSC's input (``staged_forward``'s embedding) of the stream samples ``keys``, in eval mode, in batches."""
    model = learner.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([staged_forward(model, x)[1] for _, x in learner.batches(keys)])
    model.train(was_training)
    return out


def pod_spatial(old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
    """Mean over stages of the batch-mean distance between normalised width- and height-pooled activations."""
    total = new[0].new_zeros(())
    for a, b in zip(old, new, strict=True):
        if a.dim() == 4:  # (B, C, H, W): pool along the width (-> C x H) and along the height (-> C x W)
            a = torch.cat((a.sum(3).flatten(1), a.sum(2).flatten(1)), 1)
            b = torch.cat((b.sum(3).flatten(1), b.sum(2).flatten(1)), 1)
        total = total + (F.normalize(a.flatten(1), dim=1) - F.normalize(b.flatten(1), dim=1)).norm(dim=1).mean()
    return total / max(1, len(new))


def pod_flat(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return (F.normalize(old, dim=1) - F.normalize(new, dim=1)).norm(dim=1).mean()


def lsc_scores(emb: torch.Tensor, proxies: torch.Tensor, k: int) -> torch.Tensor:
    """Class scores of the local similarity classifier: ``proxies`` is (n_classes * k, d), class-major. A proxy's
    similarity is minus the squared distance between the normalised vectors, 2 cos - 2, in [-4, 0]."""
    cos = (F.normalize(emb, dim=1) @ F.normalize(proxies, dim=1).T).view(emb.shape[0], -1, k)
    sim = 2 * cos - 2
    return (sim.softmax(dim=2) * sim).sum(2)


def nca_loss(scores: torch.Tensor, y: torch.Tensor, eta: torch.Tensor, margin: float) -> torch.Tensor:
    """PODNet's NCA loss with a margin, hinged at 0, mean over the batch. ``scores`` may hold masked entries."""
    z = eta * (scores - margin * F.one_hot(y, scores.shape[1]))
    true = z.gather(1, y.unsqueeze(1)).squeeze(1)
    others = z.scatter(1, y.unsqueeze(1), float("-inf")).logsumexp(1)
    return F.relu(others - true).mean()


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 10) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` (Lloyd's algorithm from ``k`` distinct random rows; repeats rows when
    there are fewer than ``k``)."""
    start = torch.randperm(x.shape[0], generator=generator)[:k]
    if len(start) < k:
        start = start.repeat((k + len(start) - 1) // len(start))[:k]
    c = x[start.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c


class PODNetPlugin(ExemplarPlugin):
    name = "podnet"
    # DDP: NCA and both POD terms are per-row means on the shard; proxies and eta all-reduced by the loop; k-means
    # proxy init, herding and the balanced finetuning from full passes and the shared generator, alike on every rank
    supports_ddp = True

    def __init__(self, memory_size: int, proxies: int, margin: float, lambda_spatial: float, lambda_flat: float,
                 selection: str = "herding", fix_old: bool = True, balanced_epochs: int = 20,
                 balanced_lr: float = 0.05) -> None:
        super().__init__(memory_size, selection)
        self.fix_old, self.balanced_epochs, self.balanced_lr = fix_old, balanced_epochs, balanced_lr
        self._old_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.k, self.margin = proxies, margin
        self.lambda_spatial, self.lambda_flat = lambda_spatial, lambda_flat
        self.proxies: torch.Tensor | None = None
        self.log_eta = torch.zeros((), requires_grad=True)
        self._stash: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None

    def check(self, model: nn.Module, stream) -> None:
        super().check(model, stream)
        if not hasattr(model, "stages") and not isinstance(getattr(model, "body", None), nn.Sequential):
            raise ConfigError("strategy: podnet needs a backbone whose stages it can read: model mlp or "
                              "resnet18_reduced")

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_eta] + ([self.proxies] if self.proxies is not None else [])

    def before_fit(self, learner, stream) -> None:
        super().before_fit(learner, stream)
        dev = learner.device
        if self.proxies is None:  # a resumed run already holds its proxies
            d = learner.model.head.in_features
            self.proxies = nn.init.kaiming_normal_(torch.empty(stream.n_classes * self.k, d), nonlinearity="linear")
        self.proxies = self.proxies.detach().to(dev).requires_grad_(True)
        self.log_eta = self.log_eta.detach().to(dev).requires_grad_(True)

    def forward(self, learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        stages, emb = staged_forward(learner.model, x)
        self._stash = (x, stages, emb)
        return lsc_scores(emb, self.proxies, self.k)

    def predict(self, learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return lsc_scores(staged_forward(learner.model, x)[1], self.proxies, self.k)

    def criterion(self, learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        loss = nca_loss(logits, batch.y, self.log_eta.exp(), self.margin)
        if self.old_classes is None:
            return loss
        x = learner.model_input(batch.x)
        stash = self._stash
        stages, emb = (stash[1], stash[2]) if stash is not None and stash[0] is x else staged_forward(learner.model, x)
        self._stash = None
        with torch.no_grad():
            old_stages, old_emb = staged_forward(self.teacher(learner), x)
        factor = (len(self.old_classes) / len(self.current_classes)) ** 0.5
        if self.lambda_spatial > 0 and stages:
            loss = loss + self.lambda_spatial * factor * pod_spatial(old_stages, stages)
        return loss + self.lambda_flat * factor * pod_flat(old_emb, emb)

    def before_experience(self, learner, exp) -> None:
        super().before_experience(learner, exp)
        new = [c for c in self.current_classes.tolist() if c not in set(self.seen)]
        if new:
            self._init_proxies(learner, exp, new)
        self._old_rows = None
        if self.fix_old and self.old_classes is not None:
            rows = (self.old_classes.unsqueeze(1) * self.k + torch.arange(self.k, device=learner.device)).flatten()
            self._old_rows = (rows, self.proxies.detach()[rows].clone())

    def after_step(self, learner, batch: Batch) -> None:
        if self._old_rows is not None:  # the old classes' proxies stay as they were (weight decay included)
            rows, values = self._old_rows
            with torch.no_grad():
                self.proxies[rows] = values

    def _init_proxies(self, learner, exp, new: list[int]) -> None:
        feats = F.normalize(embeddings(learner, learner.stream.keys(exp.train)), dim=1)
        y = exp.y_train.to(feats.device)
        with torch.no_grad():
            for c in new:
                self.proxies[c * self.k : (c + 1) * self.k] = kmeans(feats[y == c], self.k, learner.generator)

    def after_experience(self, learner, exp) -> None:
        self._stash = self._old_rows = None
        incremental = self.old_classes is not None
        super().after_experience(learner, exp)  # exemplars chosen, teacher frozen
        if incremental and self.balanced_epochs > 0:
            self._balanced_finetune(learner)

    def _balanced_finetune(self, learner) -> None:
        """The LSC (every proxy and eta) trained on the class-balanced exemplars' frozen embeddings."""
        m = self.memory
        emb = embeddings(learner, m.key[: m.size])
        y, t = m.y[: m.size].to(emb.device), m.t[: m.size].to(emb.device)
        opt = torch.optim.SGD([self.proxies, self.log_eta], lr=self.balanced_lr)
        bs = learner.config.batch_size
        for _ in range(self.balanced_epochs):
            order = torch.randperm(m.size, generator=learner.generator).to(emb.device)
            for s in range(0, m.size, bs):
                idx = order[s : s + bs]
                scores = lsc_scores(emb[idx], self.proxies, self.k)
                if learner.multi_head:
                    scores = scores.masked_fill(~learner.task_mask[t[idx]], MASKED_LOGIT)
                opt.zero_grad(set_to_none=True)
                nca_loss(scores, y[idx], self.log_eta.exp(), self.margin).backward()
                opt.step()
        self.proxies.grad = self.log_eta.grad = None

    def report(self, learner, stream) -> dict[str, float]:
        return {"podnet_eta": float(self.log_eta.detach().exp())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "proxies": self.proxies.detach(), "log_eta": self.log_eta.detach()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # trainable again (a resume's before_fit also sets this; a DDP broadcast between experiences does not)
        self.proxies = state["proxies"].detach().clone().requires_grad_(True)
        self.log_eta = state["log_eta"].detach().clone().requires_grad_(True)


@register_strategy("podnet")
def podnet(memory_size: PositiveInt = 500, proxies: PositiveInt = 10,
           margin: Annotated[float, Interval(0, 2, why="a gap between cosines")] = 0.6,
           lambda_spatial: NonNegative = 3.0, lambda_flat: NonNegative = 1.0,
           selection: Literal["herding", "random"] = "herding", fix_old: bool = True,
           balanced_epochs: Annotated[int, Min(0, why="0 = no class-balanced finetuning")] = 20,
           balanced_lr: Positive = 0.05) -> list[Plugin]:
    """PODNet (Douillard et al. 2020): pooled-output distillation (spatial + flat), local similarity classifier, NCA.

    ``memory_size`` (>= 1): class-balanced exemplars; ``proxies`` (>= 1): proxies per class (paper: 10);
    ``margin`` in [0, 2]: NCA margin (paper: 0.6); ``lambda_spatial``, ``lambda_flat`` (>= 0): POD weights
    (paper: 3 and 1 on CIFAR-100); ``selection``: exemplars by herding or at random.
    """
    return [PODNetPlugin(memory_size, proxies, margin, lambda_spatial, lambda_flat, selection, fix_old,
                         balanced_epochs, balanced_lr)]
