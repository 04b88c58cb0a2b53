"""Experiment configs: YAML in, a validated and fully resolved dict out, before any training.

Top-level keys::

    name: er_split_mnist                  # folder name of the experiment
    scenario: {name: class_incremental, dataset: mnist5k, root: null, download: false, <generator params>}
    model: {name: mlp, <model params>}
    strategy: {name: er, <strategy params>, label: null, plugins: [{name: lwf, ...}], train: {lr: ...}}
                                                     # or a list of these; train: overrides the shared train
    train: {epochs, batch_size, optimizer, lr, ...}   # see cltoolbox.train_config.TrainConfig
    seeds: [0, 1, 2]                      # a run's own config.yaml has `seed: 0` instead (seeds wins if both)
    out: runs

Every plugin's parameters come from its signature (cltoolbox.params), so unknown keys, wrong types and
missing values are reported with the field path, e.g. ``strategy.memroy_size: unknown key (did you mean
'memory_size'?)``.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

from cltoolbox.errors import ConfigError
from cltoolbox.params import closest, resolve, signature_params

TOP_KEYS = ("name", "imports", "scenario", "model", "strategy", "train", "seeds", "out", "loggers")
SCENARIO_RESERVED = ("name", "dataset", "root", "download", "validation")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
MAX_NAME = 255  # bytes in one folder name on common file systems (names are ASCII: NAME_RE)
MAX_SEED = 2**64  # torch.manual_seed takes seeds below 2**64


def check_folder_name(value: Any, field: str) -> str:
    """A name that becomes one folder of the run layout: folder-safe characters, at most MAX_NAME of them."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(f"{field}: {value!r} must be a folder-safe string (letters, digits, _ . + -)")
    if len(value) > MAX_NAME:
        raise ConfigError(f"{field}: {len(value)} characters, but a folder name holds at most {MAX_NAME}; "
                          "shorten it")
    return value


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key repeated in one mapping (where the last one would silently win)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} appears twice in one mapping; keep one",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file '{path}' not found; pass the path of an experiment YAML")
    try:
        data = safe_load(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read '{path}' ({type(e).__name__}: {e}); check the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None and (mark is None or cmark.line != mark.line):
            problem += f", {ctx} at line {cmark.line + 1}"  # e.g. the unclosed `{` a few lines up
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
            value = safe_load(raw)
        except yaml.constructor.ConstructorError as e:
            raise ConfigError(f"override '{item}': {e.problem}") from None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML; quote it or close its brackets, "
                              "e.g. seeds=[0,1]") from None
        node: Any = config
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part in '{key}'; write e.g. train.lr=0.05")
        for i, part in enumerate(parts):
            here = ".".join(parts[:i])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    rest = ".".join(parts[i + 1:] if part.isdigit() else parts[i:])
                    raise ConfigError(f"override '{item}': '{here}' is a list of {len(node)}; index it from 0, "
                                      f"e.g. {here}.0{'.' + rest if rest else ''}={raw}")
                slot: Any = int(part)
            elif part.isdigit() and part not in node and here:
                raise ConfigError(f"override '{item}': '{here}' is a single mapping, not a list; drop the index, "
                                  f"e.g. {'.'.join(parts[:i] + parts[i + 1:])}={raw}")
            else:
                slot = part
            if i == len(parts) - 1:
                node[slot] = value
            else:
                node = node[slot] if isinstance(node, list) else node.setdefault(slot, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
    return config


def _section(config: dict, key: str, required: bool = True) -> dict:
    value = config.get(key)
    if value is None:
        if not required:  # absent, or `train:` with nothing under it
            return {}
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


def _resolve_strategy(entry: Any, field: str, top: bool = True) -> dict[str, Any]:
    from cltoolbox.loop import TrainConfig
    from cltoolbox.registry import STRATEGIES

    if isinstance(entry, str):  # `strategy: [naive, er]`: a name alone means its defaults
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{field}: expected a name or a mapping like {{name: er, memory_size: 500}}, got {entry!r}")
    reg, _ = _named(entry, field, STRATEGIES)
    given = {k: v for k, v in entry.items() if k not in ("name", "label", "plugins", "train")}
    out: dict[str, Any] = {"name": entry["name"], **resolve(reg.params, given, field)}
    if entry.get("train") is not None:  # this strategy's own training settings, over the shared `train:`
        if not top:
            raise ConfigError(f"{field}.train: plugins share their strategy's training; move `train:` up to it")
        if not isinstance(entry["train"], dict):
            raise ConfigError(f"{field}.train: expected a mapping like {{lr: 0.01}}, got {entry['train']!r}")
        full = resolve(signature_params(TrainConfig), entry["train"], f"{field}.train")
        out["train"] = {k: full[k] for k in entry["train"]}
    extra = entry.get("plugins") or []
    if not isinstance(extra, list):
        raise ConfigError(f"{field}.plugins: expected a list of strategy mappings, e.g. [{{name: lwf}}]")
    out["plugins"] = [_resolve_strategy(p, f"{field}.plugins[{i}]", top=False) for i, p in enumerate(extra)]
    label = entry.get("label") or "+".join([entry["name"], *(p["name"] for p in out["plugins"])])
    out["label"] = check_folder_name(label, f"{field}.label")
    return out


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check every field and fill every default; returns the resolved config (strategy is always a list)."""
    from cltoolbox.loop import TrainConfig
    from cltoolbox.registry import DATASETS, MODELS, SCENARIOS

    for key in config:
        if key not in TOP_KEYS and key != "seed":  # `seed`: a run's own config.yaml, see run_config
            raise ConfigError(f"{key}: unknown top-level key{closest(str(key), TOP_KEYS)}; remove it or use one of: "
                              f"{', '.join(TOP_KEYS)}")
    name = config.get("name")
    if name is None:
        raise ConfigError("name: missing; add e.g. `name: split_mnist` (the experiment's folder name)")
    check_folder_name(name, "name")

    scen = _section(config, "scenario")
    entry, _ = _named(scen, "scenario", SCENARIOS)
    if not getattr(entry.factory, "needs_dataset", True):  # it builds its own data (e.g. `avalanche`)
        if scen.get("dataset") is not None:
            raise ConfigError(f"scenario.dataset: the {scen['name']} scenario builds its own data; remove dataset")
        scen = {**scen, "dataset": None}
    elif "dataset" not in scen:
        raise ConfigError("scenario.dataset: missing; run `cltoolbox list datasets` for the choices")
    else:
        DATASETS.get(str(scen["dataset"]), "scenario.dataset")
    ds = resolve(signature_params(_dataset_fields),
                 {k: scen[k] for k in ("root", "download", "validation") if k in scen}, "scenario")
    if not 0.0 <= ds["validation"] < 1.0:
        raise ConfigError(f"scenario.validation: {ds['validation']} must be in [0, 1), e.g. 0.1 holds out 10% "
                          "of each experience's training data")
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
    check_train(train, "train")
    for i, entry in enumerate(strategies):  # per-strategy overrides, checked merged with the shared section
        if "train" in entry:
            field = f"strategy[{i}].train" if isinstance(strat, list) else "strategy.train"
            check_train({**train, **entry["train"]}, field)

    seeds = config.get("seeds", [config["seed"]] if "seed" in config else [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    big = next((s for s in seeds if s >= MAX_SEED), None)
    if big is not None:
        raise ConfigError(f"seeds: {big} is too large; seeds must be below 2**64 (torch's seed range)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds} repeats a seed; list each seed once")
    out = config.get("out", "runs")
    if not isinstance(out, str):
        raise ConfigError(f"out: expected a folder path string, got {out!r}")
    resolved = {"name": name, "imports": list(config.get("imports") or []), "scenario": scenario, "model": model,
                "strategy": strategies, "train": train, "seeds": seeds, "out": out}
    if config.get("loggers"):  # absent when unused: run folders of configs without trackers stay as they were
        from cltoolbox.loggers import check_loggers

        resolved["loggers"] = check_loggers(config["loggers"])
    return resolved


def check_train(train: dict[str, Any], field: str) -> None:
    """Value checks of a resolved train section (``field`` names it in errors)."""
    from cltoolbox.precision import check_settings, resolve_device

    for key in ("epochs", "batch_size", "eval_batch_size"):
        if train[key] < 1:
            raise ConfigError(f"{field}.{key}: must be >= 1, got {train[key]}")
    if not 0 < train["lr"] < math.inf:
        raise ConfigError(f"{field}.lr: must be a finite number > 0, got {train['lr']}; e.g. `lr: 0.1`")
    for key in ("momentum", "weight_decay"):
        if not 0 <= train[key] < math.inf:
            raise ConfigError(f"{field}.{key}: must be a finite number >= 0, got {train[key]}; e.g. `{key}: 0.0`")
    if not 0 < train["gamma"] < math.inf:
        raise ConfigError(f"{field}.gamma: must be a finite number > 0, got {train['gamma']}; e.g. `gamma: 0.1`")
    if any(m < 1 for m in train["milestones"]):
        raise ConfigError(f"{field}.milestones: epochs must be >= 1, got {train['milestones']}")
    if train["augment_crop"] < 0:
        raise ConfigError(f"{field}.augment_crop: must be >= 0 (padding in pixels, 0 = off), got "
                          f"{train['augment_crop']}; e.g. 4")
    if train["workers"] is not None and train["workers"] < 0:
        raise ConfigError(f"{field}.workers: must be >= 0 (loader processes; 0 decodes in the training process) "
                          f"or null (automatic), got {train['workers']}")
    resolve_device(train["device"], f"{field}.device")  # `cuda` on a machine without one fails here, not mid-run
    check_settings(train, field)  # precision / compile this machine can run
    from cltoolbox.time_to_target import parse as parse_time_to_target

    parse_time_to_target(train.get("time_to_target"), f"{field}.time_to_target")


def _dataset_fields(root: str | None = None, download: bool = False, validation: float = 0.0) -> None:
    """Keys of the scenario section that every generator shares: local data root, permission to download,
    and the fraction of each experience's training data held out as its validation set (0 = test set)."""


def train_config(resolved: dict[str, Any]):
    from cltoolbox.loop import TrainConfig

    return TrainConfig(**resolved["train"])


def run_config(resolved: dict[str, Any], strategy: dict[str, Any], seed: int) -> dict[str, Any]:
    """The config of one run (one strategy, one seed), as written to its config.yaml; a strategy's own
    ``train:`` overrides are merged into the run's ``train`` section."""
    cfg = {k: v for k, v in resolved.items() if k not in ("strategy", "seeds")}
    cfg["train"] = {**resolved["train"], **strategy.get("train", {})}
    strategy = {k: v for k, v in strategy.items() if k != "train"}
    return copy.deepcopy({**cfg, "strategy": strategy, "seed": seed})


