"""The plugin (hook) contract of the training loop.

A strategy is a list of plugins. A plugin subclasses :class:`Plugin` and overrides only the hooks it
needs; the loop calls a hook only on the plugins that override it, so unused hooks cost nothing.

Hook order (``Learner.fit``), tested in ``tests/test_conformance.py``::

    before_fit(learner, stream)
    for each experience:
        before_experience(learner, exp)
        train_experience(learner, exp) -> bool     # first plugin returning True replaces the epochs below
        [optimizer built: param_groups(learner, params) -> list[dict] | None, first answer wins]
        for each epoch:
            before_epoch(learner, exp, epoch)
            for each batch:
                batch = transform_batch(learner, batch)          # chained: replay extends the batch
                logits = forward(learner, batch.x, batch.t)      # first tensor wins, else model(batch.x)
                         (masked to the task's classes when the stream gives task ids)
                loss = criterion(learner, batch, logits)          # first tensor returned replaces CE(logits, y)
                       + sum(loss(learner, batch, logits))
                backward
                after_backward(learner, batch)                    # gradient surgery, importance paths
                optimizer step
                after_step(learner, batch)                        # memory updates
            after_epoch(learner, exp, epoch)
        after_experience(learner, exp)
        [evaluation of every test experience, uses predict(learner, x, task_ids) -> logits | None]
        [checkpoint]
    after_fit(learner, stream)

Plugins may own trainable tensors (prompts, keys, a weighting net): ``parameters()`` lists them and every
optimizer the loop makes includes them. ``param_groups`` splits those tensors into torch parameter groups with
their own hyperparameters (a slow backbone learning rate: SLCA); it is called each time ``train_data`` builds
an optimizer (once per experience for the standard loop), so ``learner.experience`` says which one.
``cost()`` adds entries (e.g. an ensemble's parameter count or its
inference cost) to the ``cost`` section of metrics.json; ``report(learner, stream)`` adds method-specific
diagnostics (e.g. how often prompt selection picks the right task) to its ``strategy`` section after a
finished run.

``state_dict``/``load_state_dict`` must hold only tensors, numbers, strings, lists and dicts (checkpoints
are loaded with ``weights_only=True``). ``memory_usage`` reports stored items and bytes for metrics.json.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cltoolbox.errors import PluginError

if TYPE_CHECKING:
    from cltoolbox.loop import Learner
    from cltoolbox.stream import Experience, Stream

# the logit of a class a sample cannot be: another task's class in task-IL training, a class not seen yet in a
# strategy's predictions. Finite, so softmax and cross-entropy stay finite.
MASKED_LOGIT = -1e9

HOOKS = (
    "before_fit",
    "before_experience",
    "train_experience",
    "before_epoch",
    "transform_batch",
    "forward",
    "criterion",
    "loss",
    "after_backward",
    "after_step",
    "after_epoch",
    "after_experience",
    "predict",
    "after_fit",
    "param_groups",
)
# hooks where the first plugin's answer is used and the others' are ignored (see the order above)
FIRST_ANSWER_HOOKS = ("train_experience", "forward", "criterion", "predict", "param_groups")


@dataclass
class Batch:
    """A training batch: inputs, labels, task ids and, for samples of the stream, their keys (what memories
    store; see ``cltoolbox.stream``), all on the training device. ``key`` is None for inputs that are not
    stream samples (e.g. generated ones)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    key: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def cat(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, key: torch.Tensor | None = None) -> Batch:
        keys = None if self.key is None or key is None else torch.cat((self.key, key))
        return Batch(torch.cat((self.x, x)), torch.cat((self.y, y)), torch.cat((self.t, t)), keys)


class Plugin:
    """Base class of every strategy plugin. Override hooks; the defaults do nothing.

    ``composes`` names the first-answer-wins hooks (``FIRST_ANSWER_HOOKS``) this plugin overrides but can
    share with another plugin (it answers None / False when the other one should answer); two plugins of one
    run that override such a hook without this are refused.
    """

    composes: ClassVar[set[str] | frozenset[str]] = frozenset()
    # True when the plugin keeps the multi-process rules of cltoolbox.distributed: its per-batch state (memory
    # updates, sampling) depends only on the global batch seen in transform_batch, not on a rank's shard.
    # Strategies with a plugin that does not declare it refuse --nproc > 1. Read from the class's own body, not
    # inherited: a subclass that changes hooks declares it again once it has checked them.
    supports_ddp: ClassVar[bool] = False
    # True when the plugin has been checked on multi-label streams (multi-hot targets, partial labels, the BCE
    # loss): every other plugin is refused there in one line rather than failing on a shape mid-run. Read from
    # the class's own body, like supports_ddp.
    supports_multi_label: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.composes) - set(FIRST_ANSWER_HOOKS))
        if unknown:
            raise PluginError(f"{cls.__qualname__}.composes: {', '.join(map(repr, unknown))} is not a first-answer "
                              f"hook; use a set of {', '.join(FIRST_ANSWER_HOOKS)}")
        for name, value in vars(cls).items():
            if name.startswith("_") or name in HOOKS or hasattr(Plugin, name) or not inspect.isfunction(value):
                continue
            match = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85)
            if match:
                raise PluginError(f"{cls.__qualname__}.{name} is not a hook, so the loop never calls it; "
                                  f"did you mean '{match[0]}'? (a helper method that is no hook: name it _{name})")

    def before_fit(self, learner: Learner, stream: Stream) -> None: ...

    def before_experience(self, learner: Learner, exp: Experience) -> None: ...

    def train_experience(self, learner: Learner, exp: Experience) -> bool:
        """Return True when this plugin trained the experience itself (the epoch loop is skipped)."""
        return False

    def before_epoch(self, learner: Learner, exp: Experience, epoch: int) -> None: ...

    def transform_batch(self, learner: Learner, batch: Batch) -> Batch:
        return batch

    def forward(self, learner: Learner, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """Training logits over all classes for ``x`` (task ids ``t``), or None to use ``learner.model(x)``.

        For strategies whose forward pass is not the model's own (prompt selection on a frozen ViT). The loop
        still applies the multi-head task mask to what is returned.
        """
        return None

    def criterion(self, learner: Learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        """The main loss of the batch, replacing the cross-entropy; None keeps CE.

        For strategies that train with another objective (iCaRL's sigmoid BCE with distillation targets).
        The first plugin that returns a tensor wins; ``loss`` terms of all plugins are still added to it.
        """
        return None

    def loss(self, learner: Learner, batch: Batch, logits: torch.Tensor) -> torch.Tensor | float:
        """An extra loss term added to the cross-entropy."""
        return 0.0

    def after_backward(self, learner: Learner, batch: Batch) -> None: ...

    def after_step(self, learner: Learner, batch: Batch) -> None: ...

    def after_epoch(self, learner: Learner, exp: Experience, epoch: int) -> None: ...

    def after_experience(self, learner: Learner, exp: Experience) -> None: ...

    def predict(self, learner: Learner, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits over all classes for ``x``, or None to use the model's."""
        return None

    def after_fit(self, learner: Learner, stream: Stream) -> None: ...

    def param_groups(self, learner: Learner, params: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        """torch parameter groups for the optimizer ``train_data`` builds, or None for one group at ``train.*``.

        ``params`` are the tensors the loop would optimise (the model's trainable ones, then every plugin's
        ``parameters()``). Each returned dict is a torch param group: ``params`` plus any of the optimizer's
        options (``lr``, ``weight_decay``, ``momentum``...); options left out take ``train.*``. Tensors of
        ``params`` that no group names are added as one more group at ``train.*``, so a plugin names only the
        tensors it treats differently; a tensor in two groups, or one not in ``params``, is an error.
        The first plugin that answers wins: groups from two plugins could give one tensor two learning rates,
        and no merge rule is right for every pair (declare ``composes`` to share the hook).
        """
        return None

    def check(self, model: torch.nn.Module, stream: Stream) -> None:
        """Raise ``ConfigError`` when this plugin cannot work with ``model`` and ``stream``. Called before any run
        starts, with the model built on the meta device (shapes and attributes, no values)."""

    def parameters(self) -> list[torch.Tensor]:
        """Trainable tensors this plugin owns besides the model's; the loop's optimizers include them."""
        return []

    def cost(self) -> dict[str, float]:
        """Extra entries for metrics.json's ``cost`` section (e.g. ``ensemble_params``)."""
        return {}

    def report(self, learner: Learner, stream: Stream) -> dict[str, float]:
        """Method-specific diagnostics for metrics.json's ``strategy`` section, computed once the run is done."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def memory_usage(self) -> tuple[int, int]:
        """(items, bytes) of data or models this plugin stores besides the trained model."""
        return 0, 0


def implementers(plugins: list[Plugin], hook: str) -> list[Plugin]:
    """The plugins that override ``hook``: the loop dispatches only to these."""
    base = getattr(Plugin, hook)
    return [p for p in plugins if getattr(type(p), hook) is not base]


def check_composition(plugins: list[Plugin], field: str = "strategy") -> list[Plugin]:
    """Refuse two plugins that override the same first-answer-wins hook (one of them would be silently
    ignored) unless all but one declare the hook in ``composes``. Returns ``plugins``."""
    for hook in FIRST_ANSWER_HOOKS:
        sole = [p for p in implementers(plugins, hook) if hook not in p.composes]
        if len(sole) > 1:
            names = " and ".join(type(p).__name__ for p in sole[:2])
            raise PluginError(f"{field}: {names} both override '{hook}', where only the first answer counts; "
                              f"run them separately, or declare `composes = {{'{hook}'}}` on the plugin that "
                              f"can share it")
    return plugins


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def held_tensors(plugin: Plugin) -> dict[str, list[torch.Tensor]]:
    """The tensors a plugin holds, by attribute: tensors, modules' parameters and buffers, and tensors inside
    lists, tuples and dict values (nested)."""

    def collect(value: Any, out: list[torch.Tensor], depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, torch.nn.Module):
            out.extend(value.state_dict().values())
        elif depth < 3 and isinstance(value, (list, tuple, dict)):
            for v in value.values() if isinstance(value, dict) else value:
                collect(v, out, depth + 1)

    found = {}
    for name, value in vars(plugin).items():
        tensors: list[torch.Tensor] = []
        collect(value, tensors)
        if tensors:
            found[name] = tensors
    return found


def unsaved_tensors(plugin: Plugin, built: dict[str, list[torch.Tensor]], model: torch.nn.Module | None = None
                    ) -> list[str]:
    """Attributes of a plugin without its own ``state_dict`` that hold tensors it did not hold as built
    (``built``: :func:`held_tensors` of the plugin fresh from its factory): state a resumed run would lose.
    Tensors of ``model`` (the learner's, saved by the learner) do not count. Empty for plugins that implement
    ``state_dict`` (what they save is theirs to decide)."""
    if type(plugin).state_dict is not Plugin.state_dict:
        return []
    saved = {t.data_ptr() for t in model.state_dict().values()} if model is not None else set()

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(x is y or (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                                                   and torch.equal(x, y)) for x, y in zip(a, b, strict=True))

    return [name for name, tensors in held_tensors(plugin).items()
            if not same(tensors, built.get(name, [])) and not all(t.data_ptr() in saved for t in tensors)]
