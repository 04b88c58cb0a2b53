"""Multi-label class-IL: digit-grid and VOC/COCO sources, the multi_label scenario, mAP/CF1/OF1 against sklearn,
the evaluator's pools, BCE training of naive/er, multi_lane's frozen lanes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

import cltoolbox
from cltoolbox.data import load_dataset
from cltoolbox.data.base import Dataset
from cltoolbox.data.multilabel import VOC_CLASSES, digit_grids, load_coco, load_voc
from cltoolbox.errors import CLToolboxError, ConfigError, DataMissingError
from cltoolbox.multilabel import average_precision, f1_scores, scores
from cltoolbox.plugin import Plugin
from cltoolbox.registry import SCENARIOS, register_dataset, register_strategy


# -- metrics against sklearn -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed: int) -> None:
    g = np.random.default_rng(seed)
    n, k = int(g.integers(5, 60)), int(g.integers(2, 7))  # sklearn reads one column as binary, not multi-label
    y = (g.random((n, k)) < g.uniform(0.1, 0.6)).astype(int)
    y[0] = 1  # every class has a positive
    # ties on purpose: scores rounded to one decimal
    logits = np.round(g.normal(size=(n, k)), 1 if seed % 2 else 6)
    ap = average_precision(torch.tensor(logits), torch.tensor(y)).numpy()
    for c in range(k):
        assert ap[c] == pytest.approx(average_precision_score(y[:, c], logits[:, c]), abs=1e-12)
    pred = (logits > 0).astype(int)
    f = f1_scores(torch.tensor(logits), torch.tensor(y))
    cp = precision_score(y, pred, average="macro", zero_division=0)
    cr = recall_score(y, pred, average="macro", zero_division=0)
    assert f["cf1"] == pytest.approx(2 * cp * cr / (cp + cr) if cp + cr else 0.0, abs=1e-12)
    assert f["of1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
    assert f["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert scores(torch.tensor(logits), torch.tensor(y))["map"] == pytest.approx(ap.mean(), abs=1e-12)


def test_ap_without_positives_is_nan_and_left_out() -> None:
    y = torch.tensor([[1, 0], [0, 0], [1, 0]])
    s = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.4, 0.5]])
    ap = average_precision(s, y)
    assert ap[0] == 1.0 and torch.isnan(ap[1])
    assert scores(s, y)["map"] == 1.0


# -- sources ---------------------------------------------------------------------------------------------
def test_digit_grids_are_real_digits_with_matching_labels() -> None:
    base = load_dataset("digits")
    d = digit_grids(base, n_train=200, n_test=50, seed=3)
    again = digit_grids(base, n_train=200, n_test=50, seed=3)
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.y_train, again.y_train)
    other = digit_grids(base, n_train=200, n_test=50, seed=4)
    assert not torch.equal(d.train.x, other.train.x)
    assert d.train.x.shape == (200, 1, 16, 16) and d.y_train.shape == (200, 10) and d.y_train.dtype == torch.int64
    x = d.train.fetch(torch.arange(200))
    black = float(base.x_train.min())
    for i in range(200):  # each filled cell is a base digit whose class is in the label row, blanks are black
        cells = [x[i, 0, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] for r in range(2) for c in range(2)]
        filled = [cell for cell in cells if not torch.allclose(cell, torch.full_like(cell, black), atol=1e-4)]
        assert 1 <= len(filled) <= 4
        distinct = int(d.y_train[i].sum())
        assert 1 <= distinct <= len(filled)
        for cell in filled:
            match = (base.x_train[:, 0] - cell).abs().flatten(1).amax(1) < 0.01
            assert match.any()
            assert bool(d.y_train[i, base.y_train[match]].bool().any())
    n_digits = (d.y_train.sum(1) >= 1).all()
    assert n_digits


def test_registered_grid_sets_are_offline_and_fixed() -> None:
    a, b = load_dataset("digits_grid"), load_dataset("digits_grid")
    assert torch.equal(a.y_test, b.y_test) and a.n_classes == 10 and a.y_train.dim() == 2
    m = load_dataset("mnist5k_grid")
    assert m.train.x.shape == (4000, 1, 56, 56) and m.test.x.dtype == torch.uint8
    # the uint8 grid, normalised on fetch, gives back MNIST-5k's own normalisation in a filled cell
    base = load_dataset("mnist5k")
    x = m.train.fetch(torch.arange(1))
    assert float(x.min()) == pytest.approx(float(base.x_train.min()), abs=1e-3)


def _jpeg(path, size=(20, 16)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, "JPEG")


def test_voc_reader(tmp_path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2007"
    objects = {"000001": [("dog", 0), ("person", 0)], "000002": [("car", 0), ("cat", 1)], "000003": [("cat", 0)]}
    for i, objs in objects.items():
        _jpeg(base / "JPEGImages" / f"{i}.jpg")
        xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objs)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename>{xml}</annotation>")
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    d = load_voc(str(tmp_path))
    assert d.n_classes == 20 and d.y_train.shape == (2, 20)
    assert d.y_train[0].nonzero().flatten().tolist() == sorted([VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])
    assert d.y_train[1].nonzero().flatten().tolist() == [VOC_CLASSES.index("car")]  # the difficult cat left out
    assert d.test.fetch(torch.arange(1)).shape == (1, 3, 224, 224)
    (base / "Annotations" / "000003.xml").write_text("<annotation><object><name>dragon</name></object></annotation>")
    with pytest.raises(DataMissingError, match="dragon"):
        load_voc(str(tmp_path))
    with pytest.raises(DataMissingError, match="scenario.root"):
        load_voc(str(tmp_path / "nothing"))


def test_coco_reader(tmp_path) -> None:
    def instances(part: str, images: dict[int, list[int]]) -> None:
        blob = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
                "annotations": [{"id": 100 * i + k, "image_id": i, "category_id": c}
                                for i, cats in images.items() for k, c in enumerate(cats)],
                "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 7)]}
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{part}2017.json").write_text(json.dumps(blob))
        for i in images:
            _jpeg(tmp_path / f"{part}2017" / f"{i:012d}.jpg")

    instances("train", {5: [1, 7, 7], 6: [3], 9: []})
    instances("val", {8: [7, 3]})
    d = load_coco(str(tmp_path))
    assert d.n_classes == 3
    assert d.y_train.tolist() == [[1, 0, 1], [0, 1, 0]]  # image 9 has no annotation: left out
    assert d.y_test.tolist() == [[0, 1, 1]]
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DataMissingError, match="instances_val2017.json"):
        load_coco(str(tmp_path))


# -- scenario --------------------------------------------------------------------------------------------
def _toy_dataset() -> Dataset:
    """Inputs equal to the label rows (so a linear layer can read them), 4 classes."""
    g = torch.Generator().manual_seed(0)
    y_tr = (torch.rand(64, 4, generator=g) < 0.4).long()
    y_tr[y_tr.sum(1) == 0, 0] = 1
    y_te = (torch.rand(40, 4, generator=g) < 0.4).long()
    y_te[y_te.sum(1) == 0, 3] = 1
    return Dataset.from_tensors("toy", y_tr.float(), y_tr, y_te.float(), y_te, 4)


def test_scenario_protocol() -> None:
    data = _toy_dataset()
    s = SCENARIOS.get("multi_label").factory(data, 0, n_experiences=2)
    assert s.multi_label and s.to("cpu").multi_label and len(s) == 2
    for e in s:
        own = torch.zeros(4, dtype=torch.long)
        own[list(e.classes)] = 1
        holds_tr = (data.y_train * own).sum(1) > 0
        assert sorted(e.train.index.tolist()) == torch.nonzero(holds_tr).flatten().tolist()
        assert torch.equal(e.train.y, data.y_train[e.train.index] * own)  # only the experience's labels
        holds_te = (data.y_test * own).sum(1) > 0
        assert sorted(e.test.index.tolist()) == torch.nonzero(holds_te).flatten().tolist()
        assert torch.equal(e.test.y, data.y_test[e.test.index])  # test sets carry every label
    full = SCENARIOS.get("multi_label").factory(data, 0, n_experiences=2, partial_labels=False)
    e1 = full.experiences[1]
    assert torch.equal(e1.train.y, data.y_train[e1.train.index])  # classes 0..3 all seen by then
    with pytest.raises(ConfigError, match="multi-label dataset"):
        SCENARIOS.get("multi_label").factory(load_dataset("digits"), 0, n_experiences=5)


# -- evaluator and training ------------------------------------------------------------------------------
def _run(tmp_path, strategies, dataset="ml_toy", **train):
    return cltoolbox.run({
        "name": "ml", "scenario": {"name": "multi_label", "dataset": dataset, "n_experiences": 2},
        "model": {"name": "mlp", "hidden": []}, "strategy": strategies,
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1, **train}, "seeds": [0], "out": str(tmp_path),
    }, quiet=True)


@register_dataset("ml_toy")
def ml_toy(root: str | None = None, download: bool = False) -> Dataset:
    """Test-only multi-label set: inputs are the multi-hot rows themselves."""
    return _toy_dataset()


@pytest.fixture
def toy_registered() -> None:
    return None


def test_evaluator_pools_against_sklearn(tmp_path, toy_registered) -> None:
    """Every cell of the mAP matrix and every seen value, recomputed with sklearn from the run's own weights."""
    from pathlib import Path

    from cltoolbox.runfolder import load_checkpoint

    (summary,) = _run(tmp_path, {"name": "naive"})
    run = Path(summary["run_dir"])
    data = _toy_dataset()
    state = load_checkpoint(run / "checkpoint" / "state.pt")["learner"]["model"]
    w = next(v for k, v in state.items() if k.endswith("weight"))
    b = next(v for k, v in state.items() if k.endswith("bias"))
    logits = (data.test.x @ w.T + b).numpy()
    y = data.y_test.numpy()
    exps = [[0, 1], [2, 3]]
    mat = np.loadtxt(run / "matrices" / "map.csv", delimiter=",", skiprows=1)[:, 1:]
    # final row: every test image holds a class of experience 0 or 1
    for j, cls in enumerate(exps):
        expect = np.mean([average_precision_score(y[:, c], logits[:, c]) for c in cls])
        assert mat[2, j] == pytest.approx(expect, abs=1e-6)
    seen = json.loads((run / "metrics.json").read_text())["multi_label"]
    assert seen["map"] == pytest.approx(np.mean([average_precision_score(y[:, c], logits[:, c]) for c in range(4)]),
                                        abs=1e-6)
    pred = (logits > 0).astype(int)
    assert seen["of1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-6)
    assert summary["class_il"]["acc"] == pytest.approx(mat[2].mean(), abs=1e-9)
    rows = (run / "multilabel.csv").read_text().splitlines()
    assert rows[0] == "trained_exp,map,cf1,of1,macro_f1,n_test" and len(rows) == 4
    # after experience 0 the pool is the test images holding class 0 or 1
    n_pool = int(((y[:, 0] + y[:, 1]) > 0).sum())
    assert rows[2].endswith(f",{n_pool}")


@pytest.mark.parametrize("strategy", [{"name": "naive"}, {"name": "er", "memory_size": 20}])
def test_naive_and_er_train_with_bce(tmp_path, toy_registered, strategy) -> None:
    (summary,) = _run(tmp_path, strategy, epochs=3)
    assert summary["status"] == "done"
    assert summary["multi_label"]["per_step"]["map"][0] > 0.8  # learns the first experience's classes


def test_class_balanced_memory_refused_on_multi_label(tmp_path, toy_registered) -> None:
    with pytest.raises(CLToolboxError, match="reservoir"):
        _run(tmp_path, {"name": "er", "memory_size": 20, "policy": "class_balanced"})


@pytest.mark.parametrize("strategy", [{"name": "er_ace", "memory_size": 20}, {"name": "ewc"}, {"name": "icarl"}])
def test_unchecked_strategies_refused_on_multi_label(tmp_path, toy_registered, strategy) -> None:
    with pytest.raises(CLToolboxError, match=r"strategy: \w+ does not support multi-label streams") as err:
        _run(tmp_path, strategy)
    assert "\n" not in str(err.value) and not list(tmp_path.rglob("metrics.json"))


def test_er_memory_keeps_partial_labels() -> None:
    from cltoolbox.strategies.memory import ReservoirMemory

    mem = ReservoirMemory(4)
    y = torch.tensor([[1, 0, 0], [0, 1, 0]])
    mem.add(torch.tensor([3, 4]), y, torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0))
    key, yy, _ = mem.sample(5, torch.Generator().manual_seed(1))
    assert yy.shape == (5, 3) and all(yy[i].tolist() == y[int(k) - 3].tolist() for i, k in enumerate(key))


def test_multi_lane_keeps_finished_lanes_and_scores_all(tmp_path) -> None:
    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.registry import MODELS, STRATEGIES
    from cltoolbox.strategies.prompt_base import TINY_VIT

    data = digit_grids(load_dataset("digits"), n_train=120, n_test=40)
    stream = SCENARIOS.get("multi_label").factory(data, 0, n_experiences=2)
    params = {k: v for k, v in TINY_VIT.items() if k != "name"}
    torch.manual_seed(0)
    model = MODELS.get("vit").factory(stream.input_shape, stream.n_classes, **params)
    plugin = STRATEGIES.get("multi_lane").factory(n_selectors=2, prompt_length=2)[0]
    learner = Learner(model, [plugin], TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=0.01), seed=0)
    learner.begin(stream)
    learner.train_experience(stream[0])
    lane0 = {k: v.clone() for k, v in plugin.lanes[0].state_dict().items()}
    learner.train_experience(stream[1])
    assert all(torch.equal(v, plugin.lanes[0].state_dict()[k]) for k, v in lane0.items())
    x = stream[0].test.fetch()
    out = learner.logits(x, torch.zeros(len(x), dtype=torch.long))
    for lane in (0, 1):  # the parallel pass gives each lane's own logits
        alone = plugin._run(learner.model.eval(), x, [lane])[0]
        assert torch.allclose(out[:, plugin.classes[lane]], alone, atol=1e-5)
    assert plugin.cost()["lane_params"] > 0


def _lane_setup(**params):
    """A tiny ViT and a multi_lane plugin on a 2-experience digit-grid stream, lanes built, nothing trained."""
    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.registry import MODELS, STRATEGIES
    from cltoolbox.strategies.prompt_base import TINY_VIT

    data = digit_grids(load_dataset("digits"), n_train=60, n_test=20)
    stream = SCENARIOS.get("multi_label").factory(data, 0, n_experiences=2)
    torch.manual_seed(0)
    model = MODELS.get("vit").factory(stream.input_shape, stream.n_classes,
                                      **{k: v for k, v in TINY_VIT.items() if k != "name"})
    plugin = STRATEGIES.get("multi_lane").factory(n_selectors=3, prompt_length=2, **params)[0]
    learner = Learner(model, [plugin], TrainConfig(batch_size=32, optimizer="adam", lr=0.01), seed=0)
    learner.begin(stream)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random lanes: a zero classifier would make every comparison 0 == 0
        for p in plugin.lanes.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return learner, plugin, stream


def test_multi_lane_drop_and_replace_matches_a_hand_written_lane() -> None:
    """Each block: the normalised selectors summarise that block's normalised frozen input, the class tokens
    attend over [tokens; summaries] + the lane's key/value prefixes, summaries are replaced by the selectors."""
    learner, plugin, stream = _lane_setup()
    model = learner.model.eval()
    x = stream[0].test.fetch()[:5]
    lane = plugin.lanes[0]
    b = model.backbone
    with torch.no_grad():
        h = b.norm_pre(model.tokens(x))
        m, k = lane.tokens.shape[0], lane.selectors.shape[0]
        seq = torch.cat((lane.tokens, lane.selectors))[None].repeat(len(x), 1, 1)
        for i, blk in enumerate(b.blocks):
            xn, sn = blk.norm1(h), blk.norm1(seq)
            d = xn.shape[-1]
            w = (sn[:, m:] @ xn.transpose(1, 2) / d ** 0.5).softmax(-1)
            inp = torch.cat((sn[:, :m], w @ xn), 1)
            heads = blk.attn.num_heads
            q, kk, v = blk.attn.qkv(inp).chunk(3, dim=-1)
            kk = torch.cat((lane.prefixes[i, 0].expand(len(x), -1, -1), kk), 1)
            v = torch.cat((lane.prefixes[i, 1].expand(len(x), -1, -1), v), 1)
            q, kk, v = (t.reshape(len(x), t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, kk, v))
            att = (q @ kk.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1) @ v
            out = blk.attn.proj(att.transpose(1, 2).reshape(len(x), m + k, d))
            seq = seq + torch.cat((out[:, :m], sn[:, m:]), 1)
            seq = seq + blk.mlp(blk.norm2(seq))
            h = blk(h)
        feats = torch.nn.functional.normalize(b.norm(seq[:, :m]), dim=-1)
        expect = (feats * lane.weight).sum(-1) + lane.bias
        got = plugin._run(model, x, [0])[0]
    assert torch.allclose(got, expect, atol=1e-4)


@pytest.mark.parametrize("params", [{"token": "task"}, {"drop_and_replace": False, "init": "normal"}])
def test_multi_lane_variants_run_lanes_in_parallel(params) -> None:
    learner, plugin, stream = _lane_setup(**params)
    plugin.trained = 2
    x = stream[0].test.fetch()[:6]
    out = learner.logits(x, torch.zeros(len(x), dtype=torch.long))
    for lane in (0, 1):
        alone = plugin._run(learner.model.eval(), x, [lane])[0]
        assert alone.shape == (len(x), 5) and torch.allclose(out[:, plugin.classes[lane]], alone, atol=1e-5)
    assert plugin.lanes[0].tokens.shape[0] == (1 if params.get("token") == "task" else 5)


@pytest.mark.parametrize("warm", [True, False])
def test_multi_lane_new_lane_starts_from_the_previous_one(warm) -> None:
    learner, plugin, stream = _lane_setup(warm_start=warm)
    plugin.trained = 1
    before = {k: v.clone() for k, v in plugin.lanes[1].state_dict().items()}
    plugin.before_experience(learner, stream[1])
    new, old = plugin.lanes[1], plugin.lanes[0]
    for name in ("selectors", "prefixes", "tokens"):
        assert torch.equal(getattr(new, name), getattr(old, name)) == warm
    assert torch.equal(new.weight, before["weight"])  # the classifier is the lane's own classes': never copied


def test_multi_lane_orthogonal_init() -> None:
    from cltoolbox.strategies.multi_lane import _orthogonal

    gen = torch.Generator().manual_seed(0)
    few, many = _orthogonal(5, 16, gen), _orthogonal(40, 16, gen)
    assert torch.allclose(few @ few.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(many.T @ many, torch.eye(16), atol=1e-5)


def test_multi_label_history_survives_a_checkpoint() -> None:
    import io

    from cltoolbox.evaluate import History
    from cltoolbox.multilabel import ensure_tensors

    h = History(3, 4)
    ensure_tensors(h, 3, 3)
    h.ml_matrix[1, 0] = torch.tensor([0.5, 0.4, 0.3, 0.2], dtype=torch.float64)
    h.ml_seen[1] = torch.tensor([0.5, 0.4, 0.3, 0.2, 17], dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    again = History(3, 4)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.allclose(again.ml_matrix, h.ml_matrix, equal_nan=True)
    assert torch.allclose(again.ml_seen, h.ml_seen, equal_nan=True)


class _Kill(Exception):
    pass


class _Killer(Plugin):
    """Dies after experience ``at`` when armed (set on the class: the resumed run keeps the same config)."""

    supports_multi_label = True
    at = -1

    def after_experience(self, learner, exp) -> None:
        if exp.index == _Killer.at:
            raise _Kill()


@register_strategy("test_ml_killer")
def make_ml_killer() -> list[Plugin]:
    """Test-only: a simulated kill."""
    return [_Killer()]


def test_killed_multi_label_run_resumes_exactly(tmp_path) -> None:
    import contextlib
    import io
    from pathlib import Path

    def config(out):
        return {"name": "ml", "scenario": {"name": "multi_label", "dataset": "ml_toy", "n_experiences": 3,
                                           "first_classes": 2},
                "model": {"name": "mlp", "hidden": [8]},
                "strategy": {"name": "er", "memory_size": 10, "plugins": [{"name": "test_ml_killer"}]},
                "train": {"epochs": 2, "batch_size": 8, "lr": 0.1, "time_to_target": {"target": 0.9, "every": 2}},
                "seeds": [0], "out": str(out)}

    (whole,) = cltoolbox.run(config(tmp_path / "a"), quiet=True)
    _Killer.at = 1
    try:
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(CLToolboxError):
            cltoolbox.run(config(tmp_path / "b"), quiet=True)
    finally:
        _Killer.at = -1
    (resumed,) = cltoolbox.run(config(tmp_path / "b"), resume=True, quiet=True)
    a, b = Path(whole["run_dir"]), Path(resumed["run_dir"])
    for f in ("multilabel.csv", "matrices/map.csv", "matrices/of1.csv", "accuracy.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    untimed = [{k: v for k, v in r.items() if not k.endswith(("cpu_s", "wall_s"))}
               for r in whole["time_to_target"]["per_experience"]]
    assert untimed == [{k: v for k, v in r.items() if not k.endswith(("cpu_s", "wall_s"))}
                       for r in resumed["time_to_target"]["per_experience"]]
