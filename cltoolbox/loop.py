"""The common training loop: one ``Learner`` drives every strategy through the hooks of plugin.py."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cltoolbox import distributed, multilabel
from cltoolbox.augment import BatchAugment, make_augment
from cltoolbox.errors import DivergenceError
from cltoolbox.models.cache import sample_keys, uncached
from cltoolbox.optim import PlainSGD, complete_param_groups, make_optimizer, make_scheduler
from cltoolbox.plugin import HOOKS, MASKED_LOGIT, Batch, Plugin, implementers
from cltoolbox.precision import Precision, apply_channels_last, set_deterministic
from cltoolbox.precision import resolve_device as resolve_device
from cltoolbox.stream import Experience, Stream
from cltoolbox.train_config import TrainConfig


class Learner:
    """Trains ``model`` on a stream with ``plugins``; evaluation and checkpoints are driven by ``fit``.

    Attributes plugins may use: ``model``, ``optimizer``, ``device``, ``config``, ``stream``,
    ``experience`` (current), ``epoch``, ``step`` (global), ``generator`` (seeded, for sampling),
    ``task_mask`` (bool n_tasks x n_classes, on device), and ``train_data`` to run the standard epoch loop
    on any tensors (GDumb, joint, cumulative).
    """

    def __init__(self, model: nn.Module, plugins: list[Plugin], config: TrainConfig, seed: int = 0) -> None:
        self.config = config
        self.dist = distributed.current()  # None in a one-process run
        self.device = distributed.rank_device(resolve_device(config.device))
        if config.deterministic or torch.are_deterministic_algorithms_enabled():
            set_deterministic(config.deterministic)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = apply_channels_last(self.model)
        self.precision = Precision(config.precision, self.device)
        # what the training forward calls when no plugin answers `forward`: the model, or its DDP wrapper /
        # compiled version (made per train_data call; ``self.model`` stays the plain module for plugins)
        self._train_model: nn.Module = self.model
        self._compiled: nn.Module | None = None
        self._ddp_forward = False  # this step's forward went through the DDP wrapper
        # the loop's own forward of the batch: only it goes through DDP (a plugin's extra forwards, e.g. GEM's
        # memory gradients by autograd.grad, must not arm DDP's gradient hooks)
        self._main_forward = False
        # this step's batch before a rank took its shard (the batch itself in one process): what a plugin that
        # stores per-batch state (DER's logits) stores, with distributed.gather_rows for its per-row tensors
        self.global_batch: Batch | None = None
        self.plugins = list(plugins)
        if config.time_to_target is not None:  # an internal observer plugin (cltoolbox.time_to_target)
            from cltoolbox.time_to_target import observer_for

            self.plugins.append(observer_for(config.time_to_target))
        if self.dist is not None:
            distributed.check_plugins(self.plugins, "+".join(type(p).__name__ for p in self.plugins) or "naive")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # data order and plugin sampling
        self.hooks: dict[str, list[Plugin]] = {h: implementers(self.plugins, h) for h in HOOKS}
        self.optimizer: torch.optim.Optimizer | None = None
        self.stream: Stream | None = None
        self.experience: Experience | None = None
        self.task_mask: torch.Tensor | None = None
        self.multi_head = False
        self.epoch = 0
        self.step = 0
        self.train_log: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.on_epoch_end: Callable[[dict[str, Any]], None] | None = None  # progress display
        self._test_set: tuple[Stream, Any] | None = None  # evaluate_stream's per-stream cache
        self.augment: BatchAugment | None = None  # train.augment_*, built for the stream in begin()
        # (input, its augmentation) of this step's training forwards (the batch, then e.g. DER's memory batch)
        self._augmented: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- optimisation ---------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for plugin in self.plugins for p in plugin.parameters() if p.requires_grad]
        groups = next((g for p in self.hooks["param_groups"] if (g := p.param_groups(self, params)) is not None),
                      None)
        return make_optimizer(self.config, params if groups is None else complete_param_groups(groups, params))

    def forward(self, x: torch.Tensor, t: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits (a plugin's ``forward`` or the model's) of ``x``, augmented when ``train.augment_*``
        are on; multi-head streams mask each row to its task's classes. ``keys`` (the samples' stream keys,
        when known) let a frozen extractor look its cached features up by sample instead of by content."""
        pre = self._augmented[-1][1] if self.dist is not None and self._augmented and self._augmented[-1][0] is x \
            else None  # a shard augmented with its global batch (_shard)
        if pre is not None:
            with uncached():
                logits = self._logits_of(pre, t)
        elif self.augment is not None:
            raw, x = x, self.augment(x, self.generator)
            self._augmented.append((raw, x))
            with uncached():  # an augmented image occurs once: caching its frozen features would only cost
                logits = self._logits_of(x, t)
        else:
            with sample_keys(keys, self.stream):
                logits = self._logits_of(x, t)
        if self.multi_head:
            logits = logits.masked_fill(~self.task_mask[t], MASKED_LOGIT)
        return logits

    def _logits_of(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for p in self.hooks["forward"]:
            logits = p.forward(self, x, t)
            if logits is not None:
                return logits
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._train_model is not self.model and (self._main_forward or self.dist is None):
            self._ddp_forward = self.dist is not None
            return self._train_model(x)
        return self.model(x)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the model saw for ``x`` in this step's training forwards: its augmentation, or ``x`` itself.
        Distillation targets (LwF, iCaRL) are computed on it, so teacher and student see the same image."""
        return next((aug for raw, aug in self._augmented if raw is x), x)

    # -- the loop ----------------------------------------------------------------------------------
    def train_data(self, data: torch.Tensor, y: torch.Tensor, t: torch.Tensor, epochs: int | None = None) -> None:
        """The standard epoch loop, with every batch hook, over ``data``: stream keys (int64, 1-D; see
        ``cltoolbox.stream``), whose samples are fetched per batch, or model-ready float inputs on the device.

        The learner's seeded generator orders every epoch; batches of file-backed samples are decoded ahead by
        ``train.workers`` loader processes, which only decode, so results do not depend on their number.
        """
        epochs = self.config.epochs if epochs is None else epochs
        bs = self.config.batch_size
        n = int(y.shape[0])
        by_key = not torch.is_floating_point(data)
        exp = self.experience
        self.optimizer = self.make_optimizer()
        scheduler = make_scheduler(self.config, self.optimizer, epochs)
        h = self.hooks
        model, opt = self.model, self.optimizer
        # per-batch work kept to what the step needs: hook lists bound once, gathers with index_select (a
        # third of x[idx]'s cost), plain SGD's update without torch's per-call machinery (PlainSGD)
        transform, criterion, extra_loss = h["transform_batch"], h["criterion"], h["loss"]
        after_backward, after_step = h["after_backward"], h["after_step"]
        # a scheduler checks that opt.step() ran before it: only then is the optimizer's own step needed
        plain = PlainSGD(opt) if scheduler is None and PlainSGD.supports(opt) else None
        zero_grad = plain.zero_grad if plain is not None else lambda: opt.zero_grad(set_to_none=True)
        step = plain.step if plain is not None else opt.step
        prec, d = self.precision, self.dist
        autocast, scaled = prec.autocast, prec.scaler is not None
        self._train_model = self._training_module()
        # gradients DDP does not average: plugin-owned tensors always, everything when a plugin's forward
        # bypasses the wrapper
        if d is not None:
            model_params = {id(p) for p in model.parameters()}
            plugin_params = [p for g in opt.param_groups for p in g["params"] if id(p) not in model_params]
            all_params = [p for g in opt.param_groups for p in g["params"]]
        # the loss when no criterion hook answers: softmax CE, or on multi-label streams sigmoid/BCE over the
        # classes seen so far (cltoolbox.multilabel)
        if self.stream is not None and self.stream.multi_label:
            ml_classes = multilabel.seen_classes(self)

            def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return multilabel.bce_loss(logits, y, ml_classes)
        else:
            default_loss = F.cross_entropy
        model.train()
        for epoch in range(epochs):
            self.epoch = epoch
            for p in h["before_epoch"]:
                p.before_epoch(self, exp, epoch)
            start, loss_sum, n_batches = time.perf_counter(), torch.zeros((), device=self.device), 0
            order = torch.randperm(n, generator=self.generator).to(self.device)
            if by_key:
                keys = data.index_select(0, order)
                inputs = self.stream.batches([keys[s : s + bs] for s in range(0, n, bs)], self.device,
                                             self.workers())
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                if by_key:
                    batch = Batch(next(inputs), y.index_select(0, idx), t.index_select(0, idx), keys[s : s + bs])
                else:
                    batch = Batch(data.index_select(0, idx), y.index_select(0, idx), t.index_select(0, idx))
                self._augmented.clear()
                for p in transform:
                    batch = p.transform_batch(self, batch)
                share = 1.0
                self.global_batch = batch
                if d is not None:  # this rank's rows of the global batch (see cltoolbox.distributed)
                    batch, share = self._shard(batch, d)
                self._ddp_forward, self._main_forward = False, True
                with autocast():
                    logits = self.forward(batch.x, batch.t, batch.key)
                    self._main_forward = False
                    loss = None
                    for p in criterion:
                        loss = p.criterion(self, batch, logits)
                        if loss is not None:
                            break
                    if loss is None:
                        loss = default_loss(logits, batch.y) if len(batch) else logits.sum() * 0.0
                    for p in extra_loss:
                        loss = loss + p.loss(self, batch, logits)
                    if share != 1.0:  # per-row means over the shard, and terms every rank computes alike (a
                        loss = loss * share  # penalty, a memory batch), both average over ranks to the global batch's
                zero_grad()
                if scaled:
                    prec.backward(loss)
                else:
                    loss.backward()
                if d is not None:
                    distributed.all_reduce_grads(plugin_params if self._ddp_forward else all_params, d.world)
                if scaled:
                    prec.unscale(opt)
                for p in after_backward:
                    p.after_backward(self, batch)
                if scaled:
                    prec.step(opt)
                else:
                    step()
                self.step += 1
                for p in after_step:
                    p.after_step(self, batch)
                loss_sum += loss.detach()
                n_batches += 1
            if d is not None:  # every rank sees the same mean and stops together on a divergence
                loss_sum = distributed.all_reduce_mean(loss_sum)
            mean_loss = float(loss_sum) / max(1, n_batches)
            if not math.isfinite(mean_loss):
                raise DivergenceError(
                    f"training loss became {mean_loss} at experience {exp.index if exp else '?'}, epoch {epoch}; "
                    "lower train.lr or check the data"
                )
            elapsed = time.perf_counter() - start
            self.train_log.append({
                "experience": exp.index if exp is not None else -1, "epoch": epoch, "step": self.step,
                "loss": mean_loss, "lr": opt.param_groups[0]["lr"], "samples_per_s": n / max(elapsed, 1e-9),
            })
            for p in h["after_epoch"]:
                p.after_epoch(self, exp, epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end({**self.train_log[-1], "epochs": epochs})
            if scheduler is not None:
                scheduler.step()
        self._train_model = self.model

    def _training_module(self) -> nn.Module:
        """The module the training forward calls: the model, in DDP when several processes train it, compiled
        when ``train.compile`` is on."""
        module = self.model
        if self.dist is not None:
            module = distributed.wrap(module, self.device)
        if self.config.compile:
            if self._compiled is None or getattr(self._compiled, "_orig_mod", None) is not module:
                self._compiled = torch.compile(module)
            module = self._compiled
        return module

    def _shard(self, batch: Batch, d: distributed.Dist) -> tuple[Batch, float]:
        """This rank's contiguous rows of the global ``batch`` and its criterion weight (rows x world / n, so
        that DDP's mean of the ranks' gradients is the global batch's). Augmentation is drawn for the whole
        global batch, as one process draws it, and the shard's part is kept for ``forward``."""
        n = len(batch)
        lo, hi = d.shard_rows(n)
        x = batch.x
        if self.augment is not None:
            aug = self.augment(x, self.generator)
            x = x[lo:hi]
            self._augmented.append((x, aug[lo:hi]))
        else:
            x = x[lo:hi]
        key = None if batch.key is None else batch.key[lo:hi]
        return Batch(x, batch.y[lo:hi], batch.t[lo:hi], key), (hi - lo) * d.world / max(n, 1)

    def workers(self) -> int:
        """DataLoader processes that decode file-backed batches (``train.workers``; None: up to 4 for
        file-backed streams, none for in-memory ones, whose batches are one gather)."""
        if self.config.workers is not None:
            return self.config.workers
        if self.stream is None or not self.stream.file_backed():
            return 0
        return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def fetch(self, keys: torch.Tensor) -> torch.Tensor:
        """Model-ready inputs of stream ``keys`` on the training device (what replay memories store)."""
        return self.stream.fetch(keys, self.device)

    def batches(self, keys: torch.Tensor, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, inputs) of ``keys`` in order, ``eval_batch_size`` at a time, decoded ahead by the loader
        workers: how a strategy walks a whole experience (feature passes, herding, Fisher) at any scale."""
        bs = batch_size or self.config.eval_batch_size
        chunks = [keys[s : s + bs] for s in range(0, int(keys.shape[0]), bs)]
        yield from zip(chunks, self.stream.batches(chunks, self.device, self.workers()), strict=True)

    def train_experience(self, exp: Experience) -> None:
        """All hooks of one experience, up to and including after_experience."""
        self.experience = exp
        start = time.perf_counter()
        for p in self.hooks["before_experience"]:
            p.before_experience(self, exp)
        if not any(p.train_experience(self, exp) for p in self.hooks["train_experience"]):
            task = torch.full((exp.n_train,), exp.task_id, dtype=torch.long, device=exp.y_train.device)
            self.train_data(self.stream.keys(exp.train), exp.y_train, task)
        for p in self.hooks["after_experience"]:
            p.after_experience(self, exp)
        distributed.broadcast_state(self)  # several processes: every rank continues from rank 0's state
        self.train_seconds += time.perf_counter() - start

    def fit(
        self,
        stream: Stream,
        start: int = 0,
        on_experience_end: Callable[[Learner, Experience], None] | None = None,
    ) -> None:
        """Train on ``stream.experiences[start:]``; ``on_experience_end`` runs after each (evaluation,
        checkpoint). ``start > 0`` resumes after restoring a checkpoint."""
        if self.stream is not stream:
            self.begin(stream)
        for exp in stream.experiences[start:]:
            self.train_experience(exp)
            if on_experience_end is not None:
                on_experience_end(self, exp)
        for p in self.hooks["after_fit"]:
            p.after_fit(self, stream)

    def begin(self, stream: Stream) -> None:
        self.stream = stream
        self.multi_head = stream.task_labels
        self.augment = make_augment(self.config.augment_crop, self.config.augment_hflip,
                                    list({id(e.train.source): e.train.source for e in stream.experiences}.values()))
        self.task_mask = stream.task_class_mask().to(self.device)
        for p in self.hooks["before_fit"]:
            p.before_fit(self, stream)

    # -- inference -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Class-IL logits over all classes, in large batches; plugins may override (``predict``)."""
        self.model.eval()
        out = self._eval_logits(x, task_ids)
        self.model.train()
        return out

    def _eval_logits(self, data: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` without the eval()/train() switches: evaluate_stream switches once per pass, as each
        switch walks every module (about 0.1 ms per test experience for a small MLP). ``data``: model-ready
        inputs, or stream keys (int64, 1-D) whose samples are fetched ``eval_batch_size`` at a time."""
        bs = self.config.eval_batch_size
        n = int(task_ids.shape[0])
        tids = [task_ids[s : s + bs] for s in range(0, n, bs)]
        if torch.is_floating_point(data):
            out = self._chunk_logits([data[s : s + bs] for s in range(0, n, bs)], None, tids)
        else:
            keys = [data[s : s + bs] for s in range(0, n, bs)]
            out = self._chunk_logits(self.stream.batches(keys, self.device, self.workers()), keys, tids)
        return torch.cat(out) if out else torch.empty(0, self.stream.n_classes, device=self.device)

    def _chunk_logits(self, inputs: Iterable[torch.Tensor], keys: list[torch.Tensor] | None,
                      task_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of each input chunk (a plugin's ``predict`` or the model's), keyed for the feature cache."""
        out = []
        for i, (xb, tb) in enumerate(zip(inputs, task_ids, strict=True)):
            with sample_keys(None if keys is None else keys[i], self.stream):
                pred = None
                for p in self.hooks["predict"]:
                    pred = p.predict(self, xb, tb)
                    if pred is not None:
                        break
                if pred is None:
                    if self.config.channels_last and xb.dim() == 4:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    with self.precision.autocast():  # the plain model's forward only: predict hooks keep theirs
                        pred = self.model(xb).float()
                out.append(pred)
        return out

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "plugins": [p.state_dict() for p in self.plugins],
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "train_log": self.train_log,
            "train_seconds": self.train_seconds,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.precision.scaler is not None:
            state["grad_scaler"] = self.precision.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for p, s in zip(self.plugins, state["plugins"], strict=True):
            p.load_state_dict(s)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        self.step = int(state["step"])
        self.train_log = list(state["train_log"])
        self.train_seconds = float(state["train_seconds"])
