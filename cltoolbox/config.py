"""Experiment configs: YAML in, a validated and fully resolved dict out, before any training.

Top-level keys::

    name: er_split_mnist                  # folder name of the experiment
    scenario: {name: class_incremental, dataset: mnist5k, root: null, download: false, <generator params>}
    model: {name: mlp, <model params>}
    strategy: {name: er, <strategy params>, label: null, plugins: [{name: lwf, ...}]}   # or a list of these
    train: {epochs, batch_size, optimizer, lr, ...}   # see cltoolbox.loop.TrainConfig
    seeds: [0, 1, 2]
    out: runs

Every plugin's parameters come from its signature (cltoolbox.params), so unknown keys, wrong types and
missing values are reported with the field path, e.g. ``strategy.memroy_size: unknown key (did you mean
'memory_size'?)``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from cltoolbox.errors import ConfigError
from cltoolbox.params import closest, resolve, signature_params

TOP_KEYS = ("name", "scenario", "model", "strategy", "train", "seeds", "out")
SCENARIO_RESERVED = ("name", "dataset", "root", "download")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file '{path}' not found; pass the path of an experiment YAML")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: '{path}' is not valid YAML{where} ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: '{path}' must hold a mapping of keys (name, scenario, model, ...)")
    return data


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` overrides; values are parsed as YAML (``train.lr=0.05``, ``seeds=[0,1]``)."""
    import yaml

    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value, e.g. train.lr=0.05")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML") from None
        node: Any = config
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' needs a list index")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override '{item}': '{key}' needs a list index")
            node[int(last)] = value
        else:
            node[last] = value
    return config


def _section(config: dict, key: str, required: bool = True) -> dict:
    value = config.get(key, None if required else {})
    if value is None and required:
        raise ConfigError(f"{key}: missing section; add e.g. `{key}: {{name: ...}}`")
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _named(section: dict, field: str, registry) -> tuple[Any, dict]:
    if "name" not in section:
        raise ConfigError(f"{field}.name: missing; run `cltoolbox list {registry.kind}` for the choices")
    if not isinstance(section["name"], str):
        raise ConfigError(f"{field}.name: expected a string, got {section['name']!r}")
    return registry.get(section["name"], f"{field}.name"), section


def _resolve_strategy(entry: Any, field: str) -> dict[str, Any]:
    from cltoolbox.registry import STRATEGIES

    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: expected a mapping like {{name: er, memory_size: 500}}, got {entry!r}")
    reg, _ = _named(entry, field, STRATEGIES)
    given = {k: v for k, v in entry.items() if k not in ("name", "label", "plugins")}
    out: dict[str, Any] = {"name": entry["name"], **resolve(reg.params, given, field)}
    extra = entry.get("plugins") or []
    if not isinstance(extra, list):
        raise ConfigError(f"{field}.plugins: expected a list of strategy mappings, e.g. [{{name: lwf}}]")
    out["plugins"] = [_resolve_strategy(p, f"{field}.plugins[{i}]") for i, p in enumerate(extra)]
    label = entry.get("label") or "+".join([entry["name"], *(p["name"] for p in out["plugins"])])
    if not isinstance(label, str) or not NAME_RE.match(label):
        raise ConfigError(f"{field}.label: {label!r} must be a folder-safe name (letters, digits, _ . + -)")
    out["label"] = label
    return out


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check every field and fill every default; returns the resolved config (strategy is always a list)."""
    from cltoolbox.loop import TrainConfig
    from cltoolbox.registry import DATASETS, MODELS, SCENARIOS

    for key in config:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown top-level key{closest(key, TOP_KEYS)}; valid: {', '.join(TOP_KEYS)}")
    name = config.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"name: {name!r} must be a folder-safe string (letters, digits, _ . + -)")

    scen = _section(config, "scenario")
    entry, _ = _named(scen, "scenario", SCENARIOS)
    if "dataset" not in scen:
        raise ConfigError("scenario.dataset: missing; run `cltoolbox list datasets` for the choices")
    DATASETS.get(str(scen["dataset"]), "scenario.dataset")
    ds = resolve(signature_params(_dataset_fields), {k: scen[k] for k in ("root", "download") if k in scen},
                 "scenario")
    scenario = {"name": scen["name"], "dataset": scen["dataset"], **ds,
                **resolve(entry.params, {k: v for k, v in scen.items() if k not in SCENARIO_RESERVED}, "scenario")}

    mod = _section(config, "model")
    mentry, _ = _named(mod, "model", MODELS)
    model = {"name": mod["name"], **resolve(mentry.params, {k: v for k, v in mod.items() if k != "name"}, "model")}

    strat = config.get("strategy")
    if strat is None:
        raise ConfigError("strategy: missing; add e.g. `strategy: {name: naive}` or a list of strategies")
    entries = strat if isinstance(strat, list) else [strat]
    if not entries:
        raise ConfigError("strategy: the list is empty; give at least one strategy")
    strategies = [_resolve_strategy(s, f"strategy[{i}]" if isinstance(strat, list) else "strategy")
                  for i, s in enumerate(entries)]
    labels = [s["label"] for s in strategies]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"strategy: two entries share the label '{dup.pop()}'; give one a distinct `label:`")

    train_given = _section(config, "train", required=False)
    train = resolve(signature_params(TrainConfig), train_given, "train")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {train[key]}")
    if train["lr"] <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {train['lr']}")

    seeds = config.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds} repeats a seed; list each seed once")
    out = config.get("out", "runs")
    if not isinstance(out, str):
        raise ConfigError(f"out: expected a folder path string, got {out!r}")
    return {"name": name, "scenario": scenario, "model": model, "strategy": strategies, "train": train,
            "seeds": seeds, "out": out}


def _dataset_fields(root: str | None = None, download: bool = False) -> None:
    """The dataset keys of the scenario section: local data root and permission to download."""


def train_config(resolved: dict[str, Any]):
    from cltoolbox.loop import TrainConfig

    return TrainConfig(**resolved["train"])


def run_config(resolved: dict[str, Any], strategy: dict[str, Any], seed: int) -> dict[str, Any]:
    """The config of one run (one strategy, one seed), as written to its config.yaml."""
    cfg = {k: v for k, v in resolved.items() if k not in ("strategy", "seeds")}
    return copy.deepcopy({**cfg, "strategy": strategy, "seed": seed})


