"""A corpus of bad inputs (issue 14): every case is exit code 2, ONE stderr line naming the field or path, and
nothing left behind (the folder tree under the test's tmp_path is unchanged, byte for byte, after the command).

Cases run ``cltoolbox.cli.main`` in-process (validation only, well under a second each). Resume cases copy one
small finished run (made once per module) and damage it. A few go through a real subprocess at the end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from cltoolbox.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
    "model": {"name": "mlp", "hidden": [8]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "seeds": [0],
}
RUN = Path("tiny/naive/class_incremental-digits/seed_0")
LONG = "x" * 256


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder``: file bytes, None for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def assert_one_line(rc: int, err: str, fragments: tuple[str, ...]) -> None:
    assert rc == 2, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


def write(tmp: Path, cfg: dict | str, name: str = "cfg.yaml") -> str:
    path = tmp / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def merged(**sections) -> dict:
    """TINY with sections updated (a section naming another plugin replaces the section)."""
    cfg = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        same = isinstance(v, dict) and isinstance(cfg.get(k), dict) and v.get("name") in (None, cfg[k].get("name"))
        if same:
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def _multi_label(dataset: str, root: str) -> dict:
    """A multi_label run on ``dataset`` read from the case's folder ``root`` under the test's tmp dir."""
    return merged(scenario={"name": "multi_label", "dataset": dataset, "root": "{tmp}/" + root, "n_experiences": 2})


# -- config cases: (config or YAML text, extra argv, fragments) ------------------------------------------

SWEEP = {**TINY, "strategy": [{"name": "naive"}, {"name": "er", "memory_size": 20}], "grid": {"train.lr": [0.01]}}
TUNE = {**SWEEP, "evaluation": {"scenario": {"class_order": [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]}}}

CONFIG_CASES: dict[str, tuple[str, dict | str, list[str], tuple[str, ...]]] = {
    # model parameters that pass a meta-device build but fail (or are meaningless) for real
    "mlp hidden negative": ("run", merged(model={"hidden": [-5]}), [], ("model.hidden[0]", ">= 1")),
    "mlp hidden zero": ("run", merged(model={"hidden": [0]}), [], ("model.hidden[0]", ">= 1")),
    "mlp hidden second zero": ("run", merged(model={"hidden": [8, 0]}), [], ("model.hidden[1]", ">= 1")),
    "mlp dropout 2": ("run", merged(model={"dropout": 2.0}), [], ("model.dropout", "[0, 1)")),
    "mlp dropout 1": ("run", merged(model={"dropout": 1.0}), [], ("model.dropout", "[0, 1)")),
    "mlp dropout negative": ("run", merged(model={"dropout": -0.1}), [], ("model.dropout", "[0, 1)")),
    "mlp hidden huge": ("run", merged(model={"hidden": [10 ** 12]}), [], ("model", "memory")),
    "mlp hidden 1e12 (a string in YAML 1.1)": ("run", merged(model={"hidden": ["1e12"]}), [],
                                               ("model.hidden[0]", "expected int")),
    "mlp hidden 1.0e+12 (a float)": ("run", merged(model={"hidden": [1.0e12]}), [],
                                     ("model.hidden[0]", "expected int")),
    "mlp hidden huge second layer": ("run", merged(model={"hidden": [8, 10 ** 11]}), [], ("model", "memory")),
    "resnet nf zero": ("run", merged(model={"name": "resnet18_reduced", "nf": 0}), [], ("model.nf", ">= 1")),
    "resnet nf negative": ("run", merged(model={"name": "resnet18_reduced", "nf": -3}), [], ("model.nf", ">= 1")),
    "vit depth zero": ("run", merged(model={"name": "vit", "depth": 0, "patch_size": 2}), [],
                       ("model.depth", ">= 1")),
    "vit embed_dim zero": ("run", merged(model={"name": "vit", "embed_dim": 0, "patch_size": 2}), [],
                           ("model.embed_dim", ">= 1")),
    "vit num_heads zero": ("run", merged(model={"name": "vit", "num_heads": 0, "patch_size": 2}), [],
                           ("model.num_heads", ">= 1")),
    "vit patch_size zero": ("run", merged(model={"name": "vit", "patch_size": 0}), [], ("model.patch_size", ">= 1")),
    "vit mlp_ratio zero": ("run", merged(model={"name": "vit", "mlp_ratio": 0.0, "patch_size": 2}), [],
                           ("model.mlp_ratio", "> 0")),
    "vit drop_path 1.5": ("run", merged(model={"name": "vit", "drop_path": 1.5, "patch_size": 2}), [],
                          ("model.drop_path", "[0, 1)")),
    # seeds
    "seed 2^64": ("run", merged(seeds=[2 ** 64]), [], ("seeds", "2**64")),
    "seed 2^70": ("run", merged(seeds=[0, 2 ** 70]), [], ("seeds", "2**64")),
    "--seeds 2^64": ("run", TINY, ["--seeds", str(2 ** 64)], ("seeds", "2**64")),
    "sweep seed 2^64": ("sweep", {**SWEEP, "seeds": [2 ** 64]}, [], ("seeds", "2**64")),
    "transfer seed 2^64": ("transfer", merged(seeds=[2 ** 64]), [], ("seeds", "2**64")),
    "tune evaluation seed 2^64": ("tune", {**TUNE, "evaluation": {**TUNE["evaluation"], "seeds": [2 ** 64]}}, [],
                                  ("seeds", "2**64")),
    # names and labels that cannot be folder names
    "name 256 chars": ("run", merged(name=LONG), [], ("name", "255")),
    "label 256 chars": ("run", merged(strategy={"name": "naive", "label": LONG}), [], ("strategy.label", "255")),
    "sweep name 256 chars": ("sweep", {**SWEEP, "name": LONG}, [], ("name", "255")),
    "sweep grid label over 255": ("sweep", {**SWEEP, "strategy": {"name": "naive", "label": "y" * 250},
                                            "grid": {"train.lr": [0.0123456789]}}, [], ("label", "255")),
    "tune name 256 chars": ("tune", {**TUNE, "name": LONG}, [], ("name", "255")),
    # duplicate keys: the last one would silently win
    "duplicate top-level key": ("run", "name: tiny\nname: other\n", [], ("'name'", "twice", "line 2")),
    "duplicate model key": ("run", yaml.safe_dump({k: v for k, v in TINY.items() if k != "model"})
                            + "model:\n  name: mlp\n  hidden: [8]\n  hidden: [16]\n", [], ("'hidden'", "twice")),
    "duplicate flow key": ("run", yaml.safe_dump({k: v for k, v in TINY.items() if k != "train"})
                           + "train: {lr: 0.1, lr: 0.2}\n", [], ("'lr'", "twice")),
    "duplicate key in override": ("run", TINY, ["model={name: mlp, name: mlp}"], ("model=", "'name'", "twice")),
    "sweep duplicate key": ("sweep", yaml.safe_dump(SWEEP) + "seeds: [1]\n", [], ("'seeds'", "twice")),
    "tune duplicate key": ("tune", yaml.safe_dump(TUNE) + "grid: {train.lr: [0.1]}\n", [], ("'grid'", "twice")),
    "transfer duplicate key": ("transfer", yaml.safe_dump(TINY) + "seeds: [1]\n", [], ("'seeds'", "twice")),
    # tune's own keys
    "tune select.metric a list": ("tune", {**TUNE, "select": {"metric": ["acc"]}}, [], ("select.metric", "acc")),
    "tune select.setting a list": ("tune", {**TUNE, "select": {"setting": ["class_il"]}}, [],
                                   ("select.setting", "class_il")),
    "tune select.metric a mapping": ("tune", {**TUNE, "select": {"metric": {"acc": 1}}}, [], ("select.metric",)),
    "tune out a number": ("tune", {**TUNE, "out": 5}, [], ("out", "5")),
    "tune out a list": ("tune", {**TUNE, "out": ["a"]}, [], ("out",)),
    "tune evaluation a list": ("tune", {**TUNE, "evaluation": ["scenario"]}, [], ("evaluation",)),
    "tune name a list": ("tune", {**TUNE, "name": ["t"]}, [], ("name",)),
    "sweep out a number": ("sweep", {**SWEEP, "out": 5}, [], ("out", "5")),
    "sweep strategy list with a number": ("sweep", {**SWEEP, "strategy": ["naive", 5]}, [], ("strategy[1]",)),
    "sweep grid hidden negative": ("sweep", {**SWEEP, "grid": {"model.hidden": [[8], [-5]]}}, [],
                                   ("model.hidden[0]", ">= 1")),
    "sweep grid dropout 2": ("sweep", {**SWEEP, "grid": {"model.dropout": [0.5, 2.0]}}, [], ("model.dropout",)),
    "transfer hidden negative": ("transfer", merged(model={"hidden": [-5]}), [], ("model.hidden[0]", ">= 1")),
    "transfer out a file": ("transfer", TINY, ["--out", "{tmp}/afile"], ("afile", "--out")),
    # I/O: --out that cannot be written
    "--out is a file": ("run", TINY, ["--out", "{tmp}/afile"], ("afile", "--out")),
    "--out below a file": ("run", TINY, ["--out", "{tmp}/afile/sub"], ("afile", "--out")),
    "--out under /proc": ("run", TINY, ["--out", "/proc/cltoolbox_out"], ("/proc/cltoolbox_out", "--out")),
    "--out under /sys (read-only)": ("run", TINY, ["--out", "/sys/cltoolbox_out"], ("/sys/cltoolbox_out", "--out")),
    "--out an existing read-only folder": ("run", TINY, ["--out", "/sys"], ("/sys", "cannot write", "--out")),
    "sweep --out is a file": ("sweep", SWEEP, ["--out", "{tmp}/afile"], ("afile", "--out")),
    "sweep --out under /proc": ("sweep", SWEEP, ["--out", "/proc/cltoolbox_out"], ("/proc/cltoolbox_out",)),
    "tune --out is a file": ("tune", TUNE, ["--out", "{tmp}/afile"], ("afile", "--out")),
    "tune --out under /sys": ("tune", TUNE, ["--out", "/sys/cltoolbox_out"], ("/sys/cltoolbox_out",)),
    # imports
    "imports syntax error": ("run", merged(imports=["{tmp}/broken.py"]), [], ("broken.py", "SyntaxError", "line 2")),
    "imports raises": ("run", merged(imports=["{tmp}/raises.py"]), [], ("raises.py", "ValueError", "boom")),
    "imports module raises": ("run", merged(imports=["raises_mod_for_test"]), [], ("raises_mod_for_test",
                                                                                   "RuntimeError")),
    "sweep imports syntax error": ("sweep", {**SWEEP, "imports": ["{tmp}/broken.py"]}, [], ("broken.py",
                                                                                          "SyntaxError")),
    "tune imports raises": ("tune", {**TUNE, "imports": ["{tmp}/raises.py"]}, [], ("raises.py", "ValueError")),
    # experiment trackers (loggers:)
    "loggers unknown tracker": ("run", merged(loggers=["tensorbord"]), [], ("loggers[0]", "tensorboard")),
    "loggers a number": ("run", merged(loggers=5), [], ("loggers", "list")),
    "loggers entry a number": ("run", merged(loggers=[5]), [], ("loggers[0]",)),
    "loggers unknown option": ("run", merged(loggers=[{"name": "wandb", "projct": "p"}]), [],
                               ("loggers[0].projct", "project")),
    "loggers option a number": ("run", merged(loggers=[{"name": "mlflow", "experiment": 3}]), [],
                                ("loggers[0].experiment",)),
    "loggers listed twice": ("run", merged(loggers=["tensorboard", "tensorboard"]), [], ("loggers[1]", "twice")),
    "loggers wandb mode": ("run", merged(loggers=[{"name": "wandb", "mode": "x"}]), [], ("loggers[0].mode",)),
    # search: (sweep)
    "search a number": ("sweep", {**SWEEP, "search": 5}, [], ("search", "method")),
    "search unknown method": ("sweep", {**SWEEP, "search": {"method": "tpx", "trials": 2}}, [],
                              ("search.method", "tpe")),
    "search trials 0": ("sweep", {**SWEEP, "search": {"method": "tpe", "trials": 0}}, [], ("search.trials", ">= 1")),
    "search unknown key": ("sweep", {**SWEEP, "search": {"method": "tpe", "trials": 2, "foo": 1}}, [],
                           ("search.foo", "method")),
    "search range low above high": ("sweep", {**SWEEP, "search": {"method": "tpe", "trials": 2},
                                              "grid": {"train.lr": {"low": 1.0, "high": 0.1}}}, [],
                                    ("train.lr", "below high")),
    # train: devices and numerics
    "train.precision fp8": ("run", merged(train={"precision": "fp8"}), [], ("train.precision", "bf16")),
    "train.device tpu": ("run", merged(train={"device": "tpu"}), [], ("train.device", "cuda:N")),
    "train.compile a string": ("run", merged(train={"compile": "yes"}), [], ("train.compile", "bool")),
    "train.channels_last a number": ("run", merged(train={"channels_last": 3}), [], ("train.channels_last", "bool")),
    "train.deterministic a string": ("run", merged(train={"deterministic": "x"}), [], ("train.deterministic", "bool")),
    "--nproc 0": ("run", TINY, ["--nproc", "0"], ("--nproc", ">= 1")),
    "--gpus-per-run negative": ("sweep", SWEEP, ["--gpus-per-run", "-1"], ("--gpus-per-run", ">= 0")),
    "--gpus-per-run nan": ("sweep", SWEEP, ["--gpus-per-run", "nan"], ("--gpus-per-run",)),
    # scenario: avalanche (the user's benchmark function)
    "avalanche benchmark without colon": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench"}), [],
                                          ("scenario.benchmark", "module:function")),
    "avalanche file missing": ("run", merged(scenario={"name": "avalanche", "benchmark": "nofile.py:f"}), [],
                               ("scenario.benchmark", "nofile.py")),
    "avalanche module missing": ("run", merged(scenario={"name": "avalanche", "benchmark": "nomod_xyz:f"}), [],
                                 ("scenario.benchmark", "nomod_xyz")),
    "avalanche file raises on import": ("run", merged(scenario={"name": "avalanche", "benchmark": "raises.py:f"}),
                                        [], ("scenario.benchmark", "ValueError", "boom")),
    "avalanche module raises on import": ("run", merged(scenario={"name": "avalanche",
                                                                  "benchmark": "raises_mod_for_test:f"}), [],
                                          ("scenario.benchmark", "RuntimeError", "module boom")),
    "avalanche no such function": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench.py:nope"}), [],
                                   ("scenario.benchmark", "'nope'")),
    "avalanche returns an int": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench.py:wrong"}), [],
                                 ("scenario.benchmark", "train_stream")),
    "avalanche function raises": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench.py:boom"}), [],
                                  ("scenario.benchmark", "ValueError", "inside")),
    "avalanche bad args": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench.py:wrong",
                                                   "args": {"a": 1}}), [], ("scenario.args", "'a'")),
    "avalanche with a dataset": ("run", merged(scenario={"name": "avalanche", "benchmark": "bench.py:wrong",
                                                         "dataset": "digits"}), [], ("scenario.dataset",)),
    # scenario: multi_label and its VOC / COCO readers
    "multi_label single-label dataset": ("run", merged(scenario={"name": "multi_label", "dataset": "digits",
                                                                 "n_experiences": 2}), [],
                                         ("scenario.dataset", "digits_grid")),
    "voc root missing": ("run", _multi_label("voc_multilabel", "nothing"), [], ("voc_multilabel", "scenario.root")),
    "voc annotation corrupt": ("run", _multi_label("voc_multilabel", "voc_bad_xml"), [],
                               ("voc_multilabel", "a.xml", "ParseError")),
    "voc image missing": ("run", _multi_label("voc_multilabel", "voc_no_jpg"), [],
                          ("voc_multilabel", "a.jpg", "not found")),
    "coco root missing": ("run", _multi_label("coco_multilabel", "nothing"), [],
                          ("coco_multilabel", "scenario.root")),
    "coco json corrupt": ("run", _multi_label("coco_multilabel", "coco_bad_json"), [],
                          ("coco_multilabel", "instances_train2017.json", "JSONDecodeError")),
    "coco image missing": ("run", _multi_label("coco_multilabel", "coco_no_jpg"), [],
                           ("coco_multilabel", "a.jpg", "not found")),
}

COCO_JSON = json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
                        "annotations": [{"image_id": 1, "category_id": 1}]})


def _voc(base: Path, xml: str, jpg: bool) -> None:
    year = base / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    for split in ("trainval", "test"):
        (year / "ImageSets/Main" / f"{split}.txt").write_text("a\n")
    (year / "Annotations/a.xml").write_text(xml)
    if jpg:
        (year / "JPEGImages/a.jpg").write_bytes(b"x")


def _coco(base: Path, text: str, jpg: bool) -> None:
    (base / "annotations").mkdir(parents=True)
    for part in ("train2017", "val2017"):
        (base / "annotations" / f"instances_{part}.json").write_text(text)
        (base / part).mkdir()
        if jpg:
            (base / part / "a.jpg").write_bytes(b"x")


def _fill(obj, tmp: Path):
    if isinstance(obj, str):
        return obj.replace("{tmp}", str(tmp))
    if isinstance(obj, list):
        return [_fill(v, tmp) for v in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, tmp) for k, v in obj.items()}
    return obj


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path holding the files the cases refer to: a plain file, two bad plugin files, a bad module, a
    benchmark file (avalanche) and small damaged VOC / COCO folders."""
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "broken.py").write_text("x = 1\ndef f(:\n")
    (tmp_path / "raises.py").write_text("raise ValueError('boom')\n")
    (tmp_path / "raises_mod_for_test.py").write_text("raise RuntimeError('module boom')\n")
    (tmp_path / "bench.py").write_text("def wrong():\n    return 5\n\n\ndef boom():\n    raise ValueError('inside')\n")
    _voc(tmp_path / "voc_bad_xml", "<annotation><obj", jpg=True)
    _voc(tmp_path / "voc_no_jpg", "<annotation><object><name>dog</name></object></annotation>", jpg=False)
    _coco(tmp_path / "coco_bad_json", "{not json", jpg=True)
    _coco(tmp_path / "coco_no_jpg", COCO_JSON, jpg=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_case(case: str, sandbox: Path, capsys) -> None:
    command, cfg, extra, fragments = CONFIG_CASES[case]
    path = write(sandbox, _fill(cfg, sandbox))
    argv = [command, path, *_fill(extra, sandbox)]
    if "--out" not in argv and not (isinstance(cfg, dict) and "out" in cfg):
        argv += ["--out", str(sandbox / "out")]
    before = tree(sandbox)
    rc = main([*argv, "-q"])
    assert_one_line(rc, capsys.readouterr().err, fragments)
    assert tree(sandbox) == before


# -- run-folder cases: a finished run, damaged, then --resume -------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("finished")
    cfg = write(base, TINY)
    n = torch.get_num_threads()
    try:
        assert main(["run", cfg, "--out", str(base / "out"), "-q", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    return base


def _unfinished(run: Path) -> None:
    """Make the finished run look like one killed after its first experience (checkpoint at 1)."""
    (run / "DONE").unlink()
    state = torch.load(run / "checkpoint/state.pt", weights_only=True)
    state["next_experience"] = 1
    state["history"]["rows_done"][2] = False
    torch.save(state, run / "checkpoint/state.pt")


def _edit_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        _unfinished(run)
        state = torch.load(run / "checkpoint/state.pt", weights_only=True)
        edit(state)
        torch.save(state, run / "checkpoint/state.pt")
    return damage


def _write(rel: str, text: str, unfinish: bool = False) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        if unfinish:
            _unfinished(run)
        (run / rel).write_text(text)
    return damage


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda s: s.__setitem__(key, value)


def _drop(*keys: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        node = state
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


RESUME_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "config.yaml not YAML": (_write("config.yaml", "name: [unclosed\n", unfinish=True), ("config.yaml", "--overwrite")),
    "config.yaml a list": (_write("config.yaml", "- 1\n- 2\n", unfinish=True), ("config.yaml", "--overwrite")),
    "config.yaml binary": (_write("config.yaml", "\x00\x01\x02", unfinish=True), ("config.yaml", "--overwrite")),
    "done: metrics.json corrupted": (_write("metrics.json", "{not json"), ("metrics.json", "--overwrite")),
    "done: metrics.json a list": (_write("metrics.json", "[1, 2]\n"), ("metrics.json", "--overwrite")),
    "done: metrics.json empty": (_write("metrics.json", ""), ("metrics.json", "--overwrite")),
    "checkpoint missing learner": (_edit_checkpoint(_drop("learner")), ("state.pt", "learner", "--overwrite")),
    "checkpoint missing history": (_edit_checkpoint(_drop("history")), ("state.pt", "history", "--overwrite")),
    "checkpoint missing next_experience": (_edit_checkpoint(_drop("next_experience")),
                                           ("state.pt", "next_experience", "--overwrite")),
    "checkpoint missing timing": (_edit_checkpoint(_drop("timing")), ("state.pt", "timing", "--overwrite")),
    "checkpoint missing learner.model": (_edit_checkpoint(_drop("learner", "model")), ("state.pt", "--overwrite")),
    "checkpoint missing learner.generator": (_edit_checkpoint(_drop("learner", "generator")),
                                             ("state.pt", "--overwrite")),
    "checkpoint missing history.rows_done": (_edit_checkpoint(_drop("history", "rows_done")),
                                             ("state.pt", "--overwrite")),
    "next_experience 99": (_edit_checkpoint(_set("next_experience", 99)), ("state.pt", "next_experience", "99")),
    "next_experience -1": (_edit_checkpoint(_set("next_experience", -1)), ("state.pt", "next_experience")),
    "next_experience 0": (_edit_checkpoint(_set("next_experience", 0)), ("state.pt", "next_experience")),
    "next_experience a string": (_edit_checkpoint(_set("next_experience", "1")), ("state.pt", "next_experience")),
    "next_experience a float": (_edit_checkpoint(_set("next_experience", 1.5)), ("state.pt", "next_experience")),
    "next_experience past the measured rows": (_edit_checkpoint(_set("next_experience", 2)),
                                               ("state.pt", "next_experience")),
    "checkpoint truncated": (lambda run: (_unfinished(run), (run / "checkpoint/state.pt").write_bytes(b"PK\x03\x04")),
                             ("state.pt", "--overwrite")),
    "checkpoint not a mapping": (lambda run: (_unfinished(run), torch.save([1, 2], run / "checkpoint/state.pt")),
                                 ("state.pt", "--overwrite")),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_case(case: str, finished: Path, tmp_path: Path, capsys) -> None:
    damage, fragments = RESUME_CASES[case]
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "out" / RUN)
    before = tree(tmp_path)
    rc = main(["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "out"), "--resume", "-q"])
    assert_one_line(rc, capsys.readouterr().err, fragments)
    assert tree(tmp_path) == before


REPORT_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "report --html --out a file": (["--html", "--out", "{tmp}/cfg.yaml"], ("cfg.yaml", "--out")),
    "report --html --out below a file": (["--html", "--out", "{tmp}/cfg.yaml/sub"], ("cfg.yaml", "--out")),
    "report --html --out under /proc": (["--html", "--out", "/proc/cltoolbox_out"], ("/proc/cltoolbox_out", "--out")),
    "report --out under /sys": (["--out", "/sys/cltoolbox_out"], ("/sys/cltoolbox_out", "--out")),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_case(case: str, finished: Path, tmp_path: Path, capsys) -> None:
    extra, fragments = REPORT_CASES[case]
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    before = tree(tmp_path)
    rc = main(["report", str(tmp_path / "out"), *_fill(extra, tmp_path)])
    assert_one_line(rc, capsys.readouterr().err, fragments)
    assert tree(tmp_path) == before


# -- a full disk, in-process: every write of the run folder fails with ENOSPC ---------------------------


def _no_space(monkeypatch) -> None:
    from cltoolbox import results

    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "open", Full, raising=False)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_full_disk_is_one_line_and_leaves_nothing(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = write(tmp_path, TINY if command == "run" else {**TINY, "grid": {"train.lr": [0.05]}})
    before = tree(tmp_path)
    _no_space(monkeypatch)
    rc = main([command, cfg, "--out", str(tmp_path / "out"), "-q", "--threads", "1"]
              + (["--workers", "1"] if command == "sweep" else []))
    assert_one_line(rc, capsys.readouterr().err, ("No space left on device",))
    assert tree(tmp_path) == before


# -- end to end in a fresh interpreter ---------------------------------------------------------------------


def test_subprocess_cases(tmp_path: Path) -> None:
    """The exit code and the single line hold outside pytest too (no stray warnings, no progress bars)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    (tmp_path / "afile").write_text("x")
    cases = [(merged(model={"hidden": [-5]}), []), (merged(seeds=[2 ** 64]), []), (TINY, ["--out", "afile"])]
    code = "import sys\nfrom cltoolbox.cli import main\nfor argv in sys.argv[1:]:\n" \
           "    print(main(argv.split('\\x1f')), file=sys.stderr)\n"
    argvs = []
    for i, (cfg, extra) in enumerate(cases):
        path = write(tmp_path, cfg, f"c{i}.yaml")
        argvs.append("\x1f".join(["run", path, *(extra or ["--out", str(tmp_path / "out")])]))
    before = tree(tmp_path)
    p = subprocess.run([sys.executable, "-c", code, *argvs], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 2 * len(cases), p.stderr
    for err, rc in zip(lines[::2], lines[1::2], strict=True):
        assert err.startswith("error: ") and rc == "2", p.stderr
    assert tree(tmp_path) == before


def test_corpus_size() -> None:
    assert len(CONFIG_CASES) + len(RESUME_CASES) + len(REPORT_CASES) + 2 >= 60
