"""Config resolution: overrides, defaults filled from signatures, strategy lists and plugin composition,
and the round trip of a run's config.yaml."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

import cltoolbox
from cltoolbox.config import apply_overrides, load_yaml, run_config, validate
from cltoolbox.errors import ConfigError
from cltoolbox.loop import TrainConfig
from cltoolbox.registry import MODELS, SCENARIOS, STRATEGIES

BASE = {
    "name": "tiny",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 5},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
}


def cfg(**changes) -> dict:
    out = copy.deepcopy(BASE)
    out.update(changes)
    return out


# -- overrides ---------------------------------------------------------------------------------------


def test_override_scalar_is_parsed_as_yaml():
    out = apply_overrides(BASE, ["train.lr=0.05", "train.epochs=3", "scenario.class_order=seeded"])
    assert out["train"]["lr"] == 0.05 and isinstance(out["train"]["lr"], float)
    assert out["train"]["epochs"] == 3 and isinstance(out["train"]["epochs"], int)
    assert out["scenario"]["class_order"] == "seeded"
    assert BASE["train"]["epochs"] == 1  # the input is not modified


def test_override_list_index_and_list_value():
    config = cfg(strategy=[{"name": "naive"}, {"name": "er", "memory_size": 200}])
    out = apply_overrides(config, ["strategy.1.memory_size=10", "seeds=[0,1]", "model.hidden.0=8"])
    assert out["strategy"][1] == {"name": "er", "memory_size": 10}
    assert out["strategy"][0] == {"name": "naive"}
    assert out["seeds"] == [0, 1]
    assert out["model"]["hidden"] == [8]
    assert [s["memory_size"] for s in validate(out)["strategy"] if s["name"] == "er"] == [10]


def test_override_creates_missing_sections_and_whole_mappings():
    config = {k: v for k, v in BASE.items() if k != "train"}
    out = apply_overrides(config, ["train.epochs=2", "strategy={name: er, memory_size: 30}"])
    assert out["train"] == {"epochs": 2}
    assert out["strategy"] == {"name": "er", "memory_size": 30}


@pytest.mark.parametrize("override, message", [
    ("train.lr", "key.sub=value"),
    ("strategy.0.memory_size=1", "single mapping"),
    ("train..lr=1", "empty key part"),
    ("train.lr.x=1", "not a section"),
    ("seeds=[0,", "not valid YAML"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg(train={"lr": 0.1}), [override])


def test_override_into_a_list_needs_an_index():
    config = cfg(strategy=[{"name": "naive"}, {"name": "er"}])
    with pytest.raises(ConfigError, match=r"strategy.0.memory_size=5"):
        apply_overrides(config, ["strategy.memory_size=5"])
    with pytest.raises(ConfigError, match="list of 2"):
        apply_overrides(config, ["strategy.2.memory_size=5"])


def test_exponent_floats_are_floats():
    """PyYAML reads `1e-3` as a string; the validator accepts it as the float it means."""
    resolved = validate(apply_overrides(BASE, ["train.lr=1e-3", "train.weight_decay=5E-4"]))
    assert resolved["train"]["lr"] == pytest.approx(1e-3)
    assert resolved["train"]["weight_decay"] == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        validate(apply_overrides(BASE, ["train.lr=1e-3x"]))


# -- defaults ----------------------------------------------------------------------------------------


def test_every_train_field_is_filled_with_its_default():
    resolved = validate(cfg(train={"lr": 0.05}))
    defaults = TrainConfig()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(resolved["train"]) == names
    for name in names:
        expected = 0.05 if name == "lr" else getattr(defaults, name)
        assert resolved["train"][name] == expected, name
    assert TrainConfig(**resolved["train"]).lr == 0.05
    # an absent or empty train section is all defaults
    assert validate({k: v for k, v in BASE.items() if k != "train"})["train"] == dataclasses.asdict(defaults)
    assert validate(cfg(train=None))["train"] == dataclasses.asdict(defaults)


def test_scenario_and_model_defaults_are_filled():
    resolved = validate(BASE)
    scen, model = resolved["scenario"], resolved["model"]
    assert scen["root"] is None and scen["download"] is False
    for name, p in SCENARIOS.get("class_incremental").params.items():
        assert name in scen
        if name != "n_experiences":
            assert scen[name] == p.default
    assert model == {"name": "mlp", "hidden": [16],
                     **{k: p.default for k, p in MODELS.get("mlp").params.items() if k != "hidden"}}


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_parameter_is_filled(name):
    params = STRATEGIES.get(name).params
    if any(p.required for p in params.values()):
        pytest.skip(f"{name} has required parameters")
    (resolved,) = validate(cfg(strategy={"name": name}))["strategy"]
    assert resolved["name"] == name and resolved["label"] == name and resolved["plugins"] == []
    assert set(resolved) == {"name", "label", "plugins", *params}
    for key, p in params.items():
        assert resolved[key] == p.default, key


def test_given_strategy_values_are_kept_and_coerced():
    (er,) = validate(cfg(strategy={"name": "er", "memory_size": 20, "policy": "class_balanced"}))["strategy"]
    assert er["memory_size"] == 20 and er["policy"] == "class_balanced" and er["mem_batch_size"] is None
    train = validate(cfg(train={"lr": 1}))["train"]
    assert train["lr"] == 1.0 and isinstance(train["lr"], float)  # ints are accepted for floats


# -- strategies: mapping, list, labels, plugins --------------------------------------------------------


def test_strategy_mapping_equals_one_element_list():
    as_map = validate(cfg(strategy={"name": "er", "memory_size": 50}))
    as_list = validate(cfg(strategy=[{"name": "er", "memory_size": 50}]))
    assert as_map == as_list
    assert isinstance(as_map["strategy"], list) and len(as_map["strategy"]) == 1


def test_strategy_list_keeps_order_and_labels():
    resolved = validate(cfg(strategy=[{"name": "naive"}, {"name": "er", "memory_size": 10},
                                      {"name": "er", "memory_size": 40, "label": "er_big"}]))
    assert [s["label"] for s in resolved["strategy"]] == ["naive", "er", "er_big"]
    assert [s.get("memory_size") for s in resolved["strategy"]] == [None, 10, 40]


def test_duplicate_labels_are_rejected():
    with pytest.raises(ConfigError, match="label 'er'.*distinct `label:`"):
        validate(cfg(strategy=[{"name": "er", "memory_size": 10}, {"name": "er", "memory_size": 20}]))
    with pytest.raises(ConfigError, match="label 'x'"):
        validate(cfg(strategy=[{"name": "naive", "label": "x"}, {"name": "er", "label": "x"}]))


@pytest.mark.parametrize("label", ["a/b", "../up", " space", ""])
def test_label_must_be_folder_safe(label):
    if label == "":  # an empty label falls back to the name
        assert validate(cfg(strategy={"name": "naive", "label": label}))["strategy"][0]["label"] == "naive"
        return
    with pytest.raises(ConfigError, match="strategy.label"):
        validate(cfg(strategy={"name": "naive", "label": label}))


def test_plugins_composition_is_resolved_and_labelled():
    from cltoolbox.build import build_plugins

    (s,) = validate(cfg(strategy={"name": "er", "memory_size": 30, "plugins": [{"name": "cumulative"}]}))["strategy"]
    assert s["label"] == "er+cumulative"
    assert s["memory_size"] == 30
    assert s["plugins"] == [{"name": "cumulative", "plugins": [], "label": "cumulative"}]
    made = build_plugins(s)
    assert [type(p).__name__ for p in made] == ["ReplayPlugin", "CumulativeTraining"]

    # defaults are filled inside plugins too, and errors name the nested field
    (s,) = validate(cfg(strategy={"name": "naive", "plugins": [{"name": "er"}]}))["strategy"]
    assert s["label"] == "naive+er"
    assert s["plugins"][0]["memory_size"] == STRATEGIES.get("er").params["memory_size"].default
    with pytest.raises(ConfigError, match=r"strategy.plugins\[0\].memroy_size.*did you mean 'memory_size'"):
        validate(cfg(strategy={"name": "naive", "plugins": [{"name": "er", "memroy_size": 3}]}))
    with pytest.raises(ConfigError, match=r"strategy\[1\].plugins\[0\].name.*did you mean 'naive'"):
        validate(cfg(strategy=[{"name": "naive"}, {"name": "er", "plugins": [{"name": "naiv"}]}]))
    # an explicit label wins over the composed one
    (s,) = validate(cfg(strategy={"name": "er", "label": "mine", "plugins": [{"name": "cumulative"}]}))["strategy"]
    assert s["label"] == "mine"


# -- seeds -------------------------------------------------------------------------------------------


def test_seeds_forms():
    assert validate(cfg(seeds=3))["seeds"] == [3]
    assert validate({k: v for k, v in BASE.items() if k != "seeds"})["seeds"] == [0]
    for bad in ("0", [], [0, 0], [-1], [True], [0.5]):
        with pytest.raises(ConfigError, match="seeds"):
            validate(cfg(seeds=bad))
    # a run's own config.yaml holds `seed: s`; `seeds` (e.g. from --seeds) wins when both are there
    run_cfg = {k: v for k, v in BASE.items() if k != "seeds"}
    assert validate({**run_cfg, "seed": 4})["seeds"] == [4]
    assert validate({**run_cfg, "seed": 4, "seeds": [1, 2]})["seeds"] == [1, 2]


# -- round trip --------------------------------------------------------------------------------------


def test_resolved_config_round_trips_through_yaml():
    resolved = validate(cfg(strategy=[{"name": "naive"}, {"name": "er", "memory_size": 10,
                                                          "plugins": [{"name": "cumulative"}]}], seeds=[0, 3]))
    assert validate(yaml.safe_load(yaml.safe_dump(resolved))) == resolved  # idempotent
    for strategy in resolved["strategy"]:
        for seed in resolved["seeds"]:
            text = yaml.safe_dump(run_config(resolved, strategy, seed), sort_keys=False)
            again = validate(yaml.safe_load(text))
            assert again == {**resolved, "strategy": [strategy], "seeds": [seed]}


def test_run_config_yaml_runs_again_with_the_same_config(tmp_path):
    config = cfg(scenario={"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
                 strategy={"name": "er", "memory_size": 20}, out=str(tmp_path / "a"))
    (first,) = cltoolbox.run(config, quiet=True)
    path = Path(first["run_dir"]) / "config.yaml"
    assert path.is_relative_to(tmp_path / "a")
    written = load_yaml(path)
    resolved = validate(config)
    assert written == run_config(resolved, resolved["strategy"][0], 0)
    assert validate(written) == resolved

    (second,) = cltoolbox.run(path, out=str(tmp_path / "b"), quiet=True)
    assert Path(second["run_dir"]).relative_to(tmp_path / "b") == path.parent.relative_to(tmp_path / "a")
    rewritten = load_yaml(Path(second["run_dir"]) / "config.yaml")
    assert {**rewritten, "out": None} == {**written, "out": None}
    assert second["class_il"]["acc"] == pytest.approx(first["class_il"]["acc"])  # same seed, same result


def test_a_strategy_can_override_the_shared_train_section(tmp_path: Path) -> None:
    resolved = validate(cfg(strategy=[{"name": "naive"}, {"name": "er", "train": {"lr": 0.01, "epochs": 2}}],
                            out=str(tmp_path)))
    naive, er = (run_config(resolved, s, 0) for s in resolved["strategy"])
    assert naive["train"]["lr"] == 0.05 and naive["train"]["epochs"] == 1
    assert er["train"]["lr"] == 0.01 and er["train"]["epochs"] == 2 and er["train"]["batch_size"] == 64
    assert "train" not in er["strategy"]
    summaries = cltoolbox.run(cfg(strategy=[{"name": "naive"}, {"name": "naive", "label": "slow",
                                                                 "train": {"lr": 0.001}}], out=str(tmp_path)),
                              quiet=True)
    written = yaml.safe_load(Path(summaries[1]["run_dir"], "config.yaml").read_text())
    assert written["train"]["lr"] == 0.001
    assert summaries[0]["class_il"]["acc"] != summaries[1]["class_il"]["acc"]


@pytest.mark.parametrize(("strategy", "message"), [
    ({"name": "er", "train": {"lr": 0}}, r"strategy.train.lr: must be a finite number > 0"),
    ({"name": "er", "train": {"lrr": 0.1}}, r"strategy.train.lrr: unknown key \(did you mean .lr.\?\)"),
    ({"name": "er", "train": 0.1}, r"strategy.train: expected a mapping"),
    ({"name": "er", "plugins": [{"name": "lwf", "train": {"lr": 0.1}}]}, r"plugins\[0\].train: plugins share"),
])
def test_bad_strategy_train_overrides(strategy, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(cfg(strategy=strategy))


def test_strategy_names_alone_mean_their_defaults() -> None:
    listed = validate(cfg(strategy=["naive", "er", {"name": "er", "label": "er_lwf", "plugins": ["lwf"]}]))
    full = validate(cfg(strategy=[{"name": "naive"}, {"name": "er"},
                                  {"name": "er", "label": "er_lwf", "plugins": [{"name": "lwf"}]}]))
    assert listed["strategy"] == full["strategy"]
    assert validate(cfg(strategy="er"))["strategy"] == full["strategy"][1:2]
    with pytest.raises(ConfigError, match=r"strategy\[1\].name: unknown .*did you mean 'gem'"):
        validate(cfg(strategy=["naive", "gemm"]))
    with pytest.raises(ConfigError, match=r"strategy\[0\]: expected a name or a mapping"):
        validate(cfg(strategy=[3]))


def test_yaml_merge_keys_may_override_but_repeated_keys_are_refused(tmp_path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 1}\ntrain:\n  <<: *b\n  lr: 0.05\n")
    assert load_yaml(path)["train"] == {"lr": 0.05, "epochs": 1}
    path.write_text("train:\n  lr: 0.1\n  epochs: 1\n  lr: 0.05\n")
    with pytest.raises(ConfigError, match="line 4.*'lr' appears twice"):
        load_yaml(path)
