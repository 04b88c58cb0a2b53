"""Public build functions: a config's stream, model and plugins, and the checks that build them before any
run starts. ``cltoolbox run``, ``sweep``, ``tune`` and ``transfer`` and the experiments/ scripts use these."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cltoolbox import config as cfgmod
from cltoolbox import multilabel
from cltoolbox.augment import check_augment
from cltoolbox.errors import CLToolboxError, ConfigError, one_line
from cltoolbox.plugin import Plugin, check_composition
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES, import_plugins, resolve_import_path
from cltoolbox.stream import Stream, validation_stream


def build_plugins(strategy: dict[str, Any]) -> list[Plugin]:
    """The plugins of one resolved strategy entry (its factory's, then those of its ``plugins:``)."""
    params = {k: v for k, v in strategy.items() if k not in ("name", "label", "plugins", "train")}
    made = STRATEGIES.get(strategy["name"]).factory(**params)
    plugins = [made] if isinstance(made, Plugin) else list(made)
    for extra in strategy.get("plugins", []):
        plugins += build_plugins(extra)
    return plugins


def build_stream(resolved: dict, data: Any, seed: int) -> Stream:
    """The scenario's stream for one seed (with its validation split); ConfigError if an experience is empty."""
    scen = resolved["scenario"]
    params = {k: v for k, v in scen.items() if k not in cfgmod.SCENARIO_RESERVED}
    stream = SCENARIOS.get(scen["name"]).factory(data, seed, **params)
    if len(stream) == 0:
        raise ConfigError("scenario: the generator produced no experiences; check its parameters")
    if scen.get("validation"):
        stream = validation_stream(stream, scen["validation"], seed)
    empty = [e.index for e in stream if e.n_train == 0]
    if empty:
        raise ConfigError(f"scenario: experience {empty[0]} has no training samples; check the class split")
    return stream


def build_model(resolved: dict, stream: Stream) -> torch.nn.Module:
    """The config's model, sized for the stream's input shape and classes."""
    m = resolved["model"]
    params = {k: v for k, v in m.items() if k != "name"}
    return MODELS.get(m["name"]).factory(stream.input_shape, stream.n_classes, **params)


def describe_stream(stream: Stream) -> dict[str, Any]:
    """What the run trained and tested on, in order (stream.json): classes, task ids, sizes, schedule."""

    def exp(e) -> dict[str, Any]:
        return {"index": e.index, "task_id": e.task_id, "classes": [int(c) for c in e.classes],
                "n_train": e.n_train, "n_test": e.n_test}

    return {
        "name": stream.name, "scenario": stream.scenario, "n_classes": stream.n_classes,
        "input_shape": list(stream.input_shape), "class_order": [int(c) for c in stream.class_order],
        "task_labels": stream.task_labels, "experiences": [exp(e) for e in stream.experiences],
        "eval_experiences": [exp(e) for e in stream.eval_experiences],
        "schedule": stream.schedule if stream.schedule is not None else list(range(len(stream))),
        "first_seen": stream.first_seen(),
        "info": json.loads(json.dumps(stream.info, default=str)),
    }


def load_raw(
    config: dict[str, Any] | str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """The raw config dict: YAML read, overrides applied, user plugins imported, --out/--seeds set."""
    raw = cfgmod.load_yaml(config) if isinstance(config, (str, Path)) else dict(config)
    raw = cfgmod.apply_overrides(raw, list(overrides))
    if raw.get("imports"):
        base = str(Path(config).parent) if isinstance(config, (str, Path)) else None
        import_plugins(raw["imports"], base)
        raw["imports"] = [str(resolve_import_path(s, base)) if s.endswith(".py") else s for s in raw["imports"]]
    if out is not None:
        raw["out"] = out
    if seeds is not None:
        raw["seeds"] = list(seeds)
    return raw


def check_buildable(resolved: dict, data: Any) -> Stream:
    """Build the first seed's stream, every strategy's plugins and the model (on the meta device, free),
    so that bad generator, strategy or model parameters fail before any run starts; returns the stream."""
    stream = build_stream(resolved, data, resolved["seeds"][0])
    for i, strategy in enumerate(resolved["strategy"]):
        given = strategy.get("train", {})
        where = f"strategy[{i}].train" if any(k.startswith("augment_") for k in given) else "train"
        check_augment({**resolved["train"], **given}, stream.input_shape, where)
    n = len(resolved["strategy"])
    fields = [f"strategy[{i}]" if n > 1 else "strategy" for i in range(n)]
    plugins = [check_plugins(strategy, field) for strategy, field in zip(resolved["strategy"], fields, strict=True)]
    for group, field in zip(plugins, fields, strict=True):
        multilabel.check_plugins(group, stream, field)
    model = check_model(resolved, stream)
    for plugin in (p for group in plugins for p in group):
        plugin.check(model, stream)  # strategy x model x stream constraints (e.g. a prompt layer past the depth)
    return stream


def check_plugins(strategy: dict[str, Any], field: str = "strategy") -> list[Plugin]:
    """Build a strategy's plugins before any run starts; a parameter value that its factory does not check
    itself (and so raises something else than a ConfigError) is reported as one line naming the strategy."""
    try:
        return check_composition(build_plugins(strategy), field)
    except CLToolboxError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{field}: {strategy['name']} cannot be built with these parameters ({one_line(e)}); "
                          f"check the {field}.* values") from e


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_model(resolved: dict, stream: Stream) -> torch.nn.Module:
    """Build the model on the meta device (free): its parameters are checked by its factory, and its size
    against the memory of the device it will train on. Returns the meta model."""
    from cltoolbox.loop import resolve_device

    name = resolved["model"]["name"]
    try:
        with torch.device("meta"):
            model = build_model(resolved, stream)
    except CLToolboxError:
        raise
    except Exception as e:  # noqa: BLE001 - a parameter value the factory does not check itself
        raise ConfigError(f"model: {name} cannot be built with these parameters ({one_line(e)}); check the "
                          "model.* values") from e
    device = resolve_device(resolved["train"]["device"])
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    memory = _memory_bytes(device)
    if memory is not None and size > memory:
        n = sum(p.numel() for p in model.parameters())
        raise ConfigError(f"model: {name} has {n:,} parameters ({size / 2**30:,.1f} GiB), more than the "
                          f"{memory / 2**30:,.1f} GiB memory of {device}; make it smaller (e.g. model.hidden)")
    return model
