"""Properties of the built-in scenario generators on real (offline) data: digits 8x8 and MNIST-5k 28x28."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from cltoolbox.data import Dataset, load_dataset
from cltoolbox.data.source import Source
from cltoolbox.errors import ConfigError
from cltoolbox.scenarios.domain import permuted, rotate, rotated
from cltoolbox.scenarios.incremental import class_incremental, class_splits, domain_incremental, task_incremental


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist5k")


def row_keys(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Each sample as a hashable (pixels, label): multisets of samples can then be compared exactly."""
    return Counter(zip(map(bytes, x.reshape(x.shape[0], -1).numpy().view("uint8")), y.tolist(), strict=True))


def column_keys(x: torch.Tensor) -> Counter:
    """Each input position as the vector of its values over all samples: two batches are one fixed permutation
    of positions apart exactly when these multisets are equal."""
    flat = x.reshape(x.shape[0], -1).T.contiguous().numpy()
    return Counter(bytes(col.view("uint8")) for col in flat)


# -- class- and task-incremental ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, sizes", [
    ({"n_experiences": 5}, [2] * 5),
    ({"n_experiences": 2}, [5, 5]),
    ({"n_experiences": 10}, [1] * 10),
    ({"n_experiences": 1}, [10]),
    ({"classes_per_exp": 2}, [2] * 5),
    ({"classes_per_exp": 5, "n_experiences": 2}, [5, 5]),
    ({"first_classes": 4, "n_experiences": 4}, [4, 2, 2, 2]),
    ({"first_classes": 6, "classes_per_exp": 2}, [6, 2, 2]),
    ({"first_classes": 10, "n_experiences": 1}, [10]),
])
def test_class_counts_per_experience(digits, kwargs, sizes):
    stream = class_incremental(digits, 0, **kwargs)
    assert [len(e.classes) for e in stream] == sizes
    assert class_splits(10, kwargs.get("n_experiences"), kwargs.get("first_classes"),
                        kwargs.get("classes_per_exp")) == sizes


@pytest.mark.parametrize("kwargs, field", [
    ({"n_experiences": 3}, "scenario.n_experiences"),
    ({"n_experiences": 0}, "scenario.n_experiences"),
    ({"n_experiences": 20}, "scenario.n_experiences"),
    ({}, "scenario.n_experiences"),
    ({"first_classes": 11, "n_experiences": 2}, "scenario.first_classes"),
    ({"first_classes": 0, "n_experiences": 2}, "scenario.first_classes"),
    ({"first_classes": 4, "n_experiences": 1}, "scenario.first_classes"),
    ({"first_classes": 3, "n_experiences": 4}, "scenario.n_experiences"),
    ({"classes_per_exp": 3}, "scenario.classes_per_exp"),
    ({"classes_per_exp": 0}, "scenario.classes_per_exp"),
    ({"classes_per_exp": 2, "n_experiences": 4}, "scenario.n_experiences"),
])
def test_impossible_splits(digits, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        class_incremental(digits, 0, **kwargs)


def test_fixed_order_is_ascending_and_ignores_the_seed(digits):
    a, b = class_incremental(digits, 0, n_experiences=5), class_incremental(digits, 7, n_experiences=5)
    assert [e.classes for e in a] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert a.class_order == b.class_order == list(range(10))


def test_seeded_order_is_reproducible_per_seed_and_differs_across_seeds(digits):
    orders = {seed: class_incremental(digits, seed, n_experiences=5, class_order="seeded").class_order
              for seed in range(4)}
    again = class_incremental(digits, 2, n_experiences=5, class_order="seeded")
    assert again.class_order == orders[2]
    for order in orders.values():
        assert sorted(order) == list(range(10))
    assert len({tuple(o) for o in orders.values()}) == 4
    assert orders[0] != list(range(10))
    stream = class_incremental(digits, 1, n_experiences=5, class_order="seeded")
    assert [c for e in stream for c in e.classes] == orders[1]  # experiences follow the drawn order


def test_explicit_class_order_is_honoured(digits):
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    stream = class_incremental(digits, 0, first_classes=4, n_experiences=4, class_order=order)
    assert stream.class_order == order
    assert [e.classes for e in stream] == [(3, 1, 4, 0), (5, 9), (2, 6), (8, 7)]
    for e in stream:
        assert set(e.y_train.tolist()) == set(e.classes) == set(e.y_test.tolist())


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(1, 11))])
def test_class_order_must_be_a_permutation(digits, order):
    with pytest.raises(ConfigError, match="scenario.class_order"):
        class_incremental(digits, 0, n_experiences=5, class_order=order)


@pytest.mark.parametrize("scenario", [class_incremental, task_incremental])
def test_experiences_partition_the_data(digits, scenario):
    """Disjoint classes that cover them all; every train and test sample in exactly one experience."""
    stream = scenario(digits, 3, first_classes=4, n_experiences=4, class_order="seeded")
    seen: set[int] = set()
    for e in stream:
        assert not seen & set(e.classes)
        seen |= set(e.classes)
        for x, y, x_all, y_all in ((e.x_train, e.y_train, digits.x_train, digits.y_train),
                                   (e.x_test, e.y_test, digits.x_test, digits.y_test)):
            mask = torch.isin(y_all, torch.tensor(e.classes))
            assert torch.equal(x, x_all[mask]) and torch.equal(y, y_all[mask])  # all of its classes' samples
    assert seen == set(range(10))
    for split in ("train", "test"):
        x_all, y_all = getattr(digits, f"x_{split}"), getattr(digits, f"y_{split}")
        xs = torch.cat([getattr(e, f"x_{split}") for e in stream])
        ys = torch.cat([getattr(e, f"y_{split}") for e in stream])
        assert xs.shape[0] == x_all.shape[0]
        assert row_keys(xs, ys) == row_keys(x_all, y_all)
    assert stream.n_classes == 10 and stream.input_shape == (1, 8, 8)


def test_class_incremental_has_no_task_labels(digits):
    stream = class_incremental(digits, 0, n_experiences=5)
    assert stream.task_labels is False and stream.scenario == "class_incremental"
    assert [e.task_id for e in stream] == [0] * 5 and stream.n_tasks == 1


def test_task_incremental_gives_task_ids(digits):
    stream = task_incremental(digits, 0, n_experiences=5, class_order="seeded")
    assert stream.task_labels is True and stream.scenario == "task_incremental"
    assert [e.task_id for e in stream] == [e.index for e in stream] == list(range(5))
    mask = stream.task_class_mask()
    assert mask.shape == (5, 10)
    for e in stream:
        assert mask[e.task_id].nonzero().flatten().tolist() == sorted(e.classes)
    # the same split as class_incremental with the same parameters
    assert [e.classes for e in stream] == [e.classes for e in class_incremental(digits, 0, n_experiences=5,
                                                                                 class_order="seeded")]


# -- permuted ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_first", [True, False])
def test_permuted_first_experience_unpermuted_iff_keep_first(digits, keep_first):
    stream = permuted(digits, 0, n_experiences=3, keep_first=keep_first)
    first = stream[0]
    assert torch.equal(first.x_test, digits.x_test) is keep_first
    assert torch.equal(first.x_train, digits.x_train) is keep_first
    assert torch.equal(first.y_train, digits.y_train) and torch.equal(first.y_test, digits.y_test)


def test_permuted_experiences_are_fixed_pixel_permutations(digits):
    stream = permuted(digits, 5, n_experiences=4, keep_first=True)
    assert stream.scenario == "domain_incremental" and stream.task_labels is False
    original = column_keys(torch.cat([digits.x_train, digits.x_test]))
    for e in stream:
        assert e.classes == tuple(range(10))
        assert e.x_train.shape == digits.x_train.shape and e.x_test.shape == digits.x_test.shape
        # same images: one sample's pixel values are the same multiset
        assert torch.equal(e.x_test[17].flatten().sort().values, digits.x_test[17].flatten().sort().values)
        # one permutation shared by every train and test sample of the experience
        assert column_keys(torch.cat([e.x_train, e.x_test])) == original
    # and a different one for every experience
    tests = [e.x_test for e in stream]
    for i in range(len(tests)):
        for j in range(i + 1, len(tests)):
            assert not torch.equal(tests[i], tests[j])


def test_permuted_recovers_the_permutation_on_mnist(mnist):
    """On 28x28 MNIST most positions are unique over 1000 test images: find each one's source position."""
    e = permuted(mnist, 0, n_experiences=2)[1]
    src = mnist.x_test.reshape(mnist.x_test.shape[0], -1).T.contiguous()  # one row per position
    out = e.x_test.reshape(e.x_test.shape[0], -1).T.contiguous()
    keys = [bytes(row.numpy().view("uint8")) for row in src]
    counts = Counter(keys)
    assert Counter(bytes(row.numpy().view("uint8")) for row in out) == counts  # one permutation of positions
    unique = {k: j for j, k in enumerate(keys) if counts[k] == 1}
    assert len(unique) > 500
    perm = {j: unique[k] for j, row in enumerate(out) if (k := bytes(row.numpy().view("uint8"))) in unique}
    assert len(perm) == len(unique)
    assert sum(j != i for j, i in perm.items()) > 0.9 * len(perm)  # nearly every position moved


def test_permuted_is_seeded(digits):
    a, b, c = (permuted(digits, s, n_experiences=2) for s in (1, 1, 2))
    assert torch.equal(a[1].x_test, b[1].x_test) and torch.equal(a[0].x_train, b[0].x_train)
    assert not torch.equal(a[1].x_test, c[1].x_test)


def test_permuted_train_samples(digits):
    stream = permuted(digits, 0, n_experiences=3, train_samples=100)
    assert [e.n_train for e in stream] == [100, 100, 100]
    assert all(e.n_test == digits.y_test.shape[0] for e in stream)  # the test set is never subsampled
    assert not torch.equal(stream[0].y_train, stream[1].y_train)  # a fresh subsample per experience
    big = permuted(digits, 0, n_experiences=1, train_samples=10**6)
    assert big[0].n_train == digits.y_train.shape[0]
    with pytest.raises(ConfigError, match="scenario.train_samples"):
        permuted(digits, 0, n_experiences=2, train_samples=0)
    with pytest.raises(ConfigError, match="scenario.n_experiences"):
        permuted(digits, 0, n_experiences=0)


# -- rotated -----------------------------------------------------------------------------------------


def test_rotated_angle_zero_leaves_images_unchanged(digits):
    stream = rotated(digits, 0, n_experiences=3, max_angle=90.0)
    assert torch.allclose(stream[0].x_test, digits.x_test, atol=1e-5)
    assert torch.allclose(stream[0].x_train, digits.x_train, atol=1e-5)
    assert torch.equal(stream[0].y_test, digits.y_test)


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_rotated_90_is_rot90(dataset, request):
    data = request.getfixturevalue(dataset)
    stream = rotated(data, 0, n_experiences=2, max_angle=90.0)
    assert stream.info["angles"] == [0.0, 90.0]
    x, rot = data.x_test[:64], stream[1].x_test[:64]
    expected = torch.rot90(x, 1, dims=(-2, -1))  # counter-clockwise, as the angle convention says
    assert torch.allclose(rot, expected, atol=1e-3)
    assert not torch.allclose(rot, x, atol=1e-1)


def test_rotated_45_turns_an_off_centre_blob():
    """A blob above the centre ends up above-left of it at 45 degrees, left of it at 90 (counter-clockwise)."""
    x = torch.full((1, 1, 28, 28), -0.5)
    x[0, 0, 3:6, 12:16] = 2.0
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")

    def angle(img: torch.Tensor) -> float:  # direction of the centre of mass, degrees, y pointing down
        m = (img[0, 0] + 0.5).clamp(min=0)
        return math.degrees(math.atan2(float((m * yy).sum()), float((m * xx).sum())))

    assert angle(x) == pytest.approx(-90, abs=1)
    assert angle(rotate(x, 45.0)) == pytest.approx(-135, abs=2)
    assert angle(rotate(x, 90.0)) == pytest.approx(180, abs=1) or angle(rotate(x, 90.0)) == pytest.approx(-180, abs=1)
    assert rotate(x, 45.0).amin() == pytest.approx(-0.5)  # corners padded with the background


def test_rotated_angles_spread_over_max_angle(digits):
    for n, max_angle in [(5, 180.0), (4, 90.0), (1, 180.0)]:
        stream = rotated(digits, 0, n_experiences=n, max_angle=max_angle)
        assert len(stream) == n
        expected = [i * max_angle / max(1, n - 1) for i in range(n)]
        assert stream.info["angles"] == pytest.approx(expected)
        assert stream.info["angles"][0] == 0.0 and (n == 1 or stream.info["angles"][-1] == max_angle)
        for e in stream:
            assert e.classes == tuple(range(10)) and e.x_test.shape == digits.x_test.shape


def test_rotated_explicit_angles_and_train_samples(digits):
    stream = rotated(digits, 0, n_experiences=2, angles=[180.0, 90.0], train_samples=50)
    assert stream.info["angles"] == [180.0, 90.0]
    assert torch.allclose(stream[0].x_test, torch.rot90(digits.x_test, 2, dims=(-2, -1)), atol=1e-3)
    assert [e.n_train for e in stream] == [50, 50]
    with pytest.raises(ConfigError, match="scenario.angles"):
        rotated(digits, 0, n_experiences=3, angles=[0.0, 90.0])


def test_rotated_needs_images():
    flat = Dataset.from_tensors("flat", torch.zeros(4, 40), torch.zeros(4, dtype=torch.long), torch.zeros(2, 40),
                      torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ConfigError, match="image"):
        rotated(flat, 0, n_experiences=2)


def test_rotate_fills_corners_with_the_background():
    x = torch.full((1, 3, 8, 8), 5.0)
    x[:, 1] = 7.0
    out = rotate(x, 45.0)
    assert torch.allclose(out[:, 0], torch.full((1, 8, 8), 5.0))  # each channel padded with its own minimum
    assert torch.allclose(out[:, 1], torch.full((1, 8, 8), 7.0))


def test_validation_split_replaces_test_sets_with_held_out_training_data() -> None:
    from cltoolbox.stream import validation_stream

    base = class_incremental(load_dataset("digits"), 0, n_experiences=5)
    val = validation_stream(base, 0.2, seed=0)
    for b, v in zip(base, val, strict=True):
        assert v.n_train + v.n_test == b.n_train and abs(v.n_test - 0.2 * b.n_train) <= 1
        # validation samples come from the training data, never from the test set
        rows = {tuple(r.tolist()) for r in b.x_train.flatten(1)}
        assert all(tuple(r.tolist()) in rows for r in v.x_test.flatten(1))
        assert not {tuple(r.tolist()) for r in v.x_train.flatten(1)} & {tuple(r.tolist()) for r in v.x_test.flatten(1)}
    again = validation_stream(base, 0.2, seed=0)
    assert torch.equal(again[0].y_test, val[0].y_test)
    assert not torch.equal(validation_stream(base, 0.2, seed=1)[0].y_test, val[0].y_test)


def test_domain_incremental_relabels_each_split_to_positions(digits):
    split = class_incremental(digits, 3, n_experiences=5, class_order="seeded")
    dom = domain_incremental(digits, 3, n_experiences=5, class_order="seeded")
    assert dom.n_classes == 2 and dom.scenario == "domain_incremental" and not dom.task_labels
    assert dom.info["splits"] == [list(e.classes) for e in split]
    for d, c in zip(dom, split, strict=True):
        assert d.classes == (0, 1) and d.task_id == 0
        assert torch.equal(d.x_train, c.x_train) and torch.equal(d.x_test, c.x_test)
        # label = the class's position in its split: "first or second digit of the pair"
        assert torch.equal(d.y_train, (c.y_train == c.classes[1]).long())
        assert torch.equal(d.y_test, (c.y_test == c.classes[1]).long())
    with pytest.raises(ConfigError, match="scenario.n_experiences"):
        domain_incremental(digits, 0, n_experiences=3)


def test_replay_beats_fine_tuning_on_split_domain_il(tmp_path):
    import cltoolbox

    summaries = cltoolbox.run({
        "name": "dom", "scenario": {"name": "domain_incremental", "dataset": "digits", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [64]}, "strategy": ["naive", {"name": "er", "memory_size": 200}],
        "train": {"epochs": 5, "batch_size": 32, "optimizer": "adam", "lr": 0.001}, "seeds": [0],
        "out": str(tmp_path),
    }, quiet=True)
    naive, er = (s["class_il"]["acc"] for s in summaries)
    assert er > naive + 0.05 and naive > 0.5, (naive, er)  # measured 0.81 vs 0.90; two outputs: chance is 0.5


# -- scenarios select samples by label and index; transforms apply per fetched batch -------------------------


class LabelsOnly(Source):
    """A source that knows its labels but refuses to load any sample."""

    def __init__(self, like: Source, key: str) -> None:
        self.labels, self.sample_shape, self.native_bytes, self.key = \
            like.labels, like.sample_shape, like.native_bytes, key

    def fetch(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        raise AssertionError(f"{self.key}: a sample was fetched")

    def black_level(self) -> torch.Tensor:
        return torch.zeros(self.sample_shape[0])


# every generic built-in scenario but curriculum (whose class order comes from the inputs); generators tied to
# one dataset (CORe50's sessions) build from their own dataset's labels and are tested with it
GENERIC_MODULES = ("incremental", "domain", "online", "few_shot", "recurring", "curriculum")
LABEL_ONLY_SCENARIOS = [
    ("class_incremental", {"n_experiences": 5, "class_order": "seeded"}),
    ("task_incremental", {"first_classes": 4, "n_experiences": 4}),
    ("domain_incremental", {"n_experiences": 5}),
    ("permuted", {"n_experiences": 3, "train_samples": 100}),
    ("rotated", {"n_experiences": 3}),
    ("online", {"n_tasks": 5, "chunk_size": 40, "blur": 0.1}),
    ("few_shot", {"base_classes": 4, "ways": 2, "shots": 5, "n_sessions": 3, "base_shots": 20}),
    ("power_law", {"n_tasks": 3, "n_experiences": 9, "samples_per_experience": 50}),
    ("power_law", {"n_tasks": 5, "n_experiences": 12, "samples_per_experience": 50, "tasks": "class_split"}),
    ("repetition", {"n_experiences": 8, "p_repeat": 0.5, "repeat_fraction": 0.5}),
]


def test_label_only_list_covers_every_generic_scenario_but_curriculum():
    from cltoolbox.registry import SCENARIOS

    modules = {f"cltoolbox.scenarios.{m}" for m in GENERIC_MODULES}
    generic = {n for n in SCENARIOS.names() if SCENARIOS.get(n).factory.__module__ in modules}
    assert generic - {"curriculum"} == {name for name, _ in LABEL_ONLY_SCENARIOS}


@pytest.mark.parametrize("name, params", LABEL_ONLY_SCENARIOS, ids=[f"{n}-{i}" for i, (n, _) in
                                                                     enumerate(LABEL_ONLY_SCENARIOS)])
def test_scenarios_build_from_labels_alone(digits, name, params):
    """Built over sources that refuse to load samples, a scenario gives the stream it gives on the real data:
    the same indices, labels, classes, task ids and schedule (so it never looked at a pixel)."""
    from cltoolbox.registry import SCENARIOS
    from cltoolbox.stream import validation_stream

    blind = Dataset("digits", LabelsOnly(digits.train, "blind/train"), LabelsOnly(digits.test, "blind/test"), 10)
    factory = SCENARIOS.get(name).factory
    ours, real = factory(blind, 3, **params), factory(digits, 3, **params)
    if real.test_experiences is None:
        ours, real = validation_stream(ours, 0.2, 3), validation_stream(real, 0.2, 3)
    assert (ours.schedule, ours.class_order, ours.n_classes, ours.input_shape, ours.info) == \
        (real.schedule, real.class_order, real.n_classes, real.input_shape, real.info)
    assert len(ours.views) == len(real.views)
    for a, b in zip([*ours, *(ours.test_experiences or [])], [*real, *(real.test_experiences or [])], strict=True):
        assert (a.index, a.task_id, a.classes) == (b.index, b.task_id, b.classes)
        for s, t in ((a.train, b.train), (a.test, b.test)):
            assert s.source.key.startswith("blind/")
            assert torch.equal(s.index, t.index) and torch.equal(s.y, t.y)
            assert torch.equal(ours.keys(s), real.keys(t))
    assert ours.sample_bytes() == real.sample_bytes()
    with pytest.raises(AssertionError, match="a sample was fetched"):
        ours.fetch(ours.keys(ours[0].train)[:1])


def test_recurring_streams_share_test_sets():
    """Experiences of one task test on the same Samples as the task's test experience."""
    data = load_dataset("digits")
    from cltoolbox.scenarios.online import online
    from cltoolbox.scenarios.recurring import power_law, repetition

    for stream in (power_law(data, 0, n_tasks=3, n_experiences=9, samples_per_experience=50),
                   power_law(data, 0, n_tasks=5, n_experiences=9, samples_per_experience=50, tasks="class_split"),
                   online(data, 0, n_tasks=5, chunk_size=100)):
        for e, k in zip(stream, stream.schedule, strict=True):
            assert e.test is stream.test_experiences[k].test
    rep = repetition(data, 0, n_experiences=8)
    tests = {e.classes: e.test for e in rep}
    assert all(e.test is tests[e.classes] for e in rep)  # one Samples per class set


def fetched_in_batches(stream, samples, size: int = 64) -> torch.Tensor:
    keys = stream.keys(samples)
    return torch.cat(list(stream.batches([keys[s:s + size] for s in range(0, len(keys), size)],
                                         torch.device("cpu"))))


def test_permuted_per_batch_equals_the_whole_set_permutation(mnist):
    """Each fetched batch is permuted on its own; the values are those of permuting the whole (subsampled)
    set at once, with the permutations and subsamples drawn as before (one generator for the permutations,
    all drawn first, another for the subsamples)."""
    stream = permuted(mnist, 3, n_experiences=3, train_samples=500)
    d, n = 28 * 28, mnist.y_train.shape[0]
    g_perm, g_sub = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    perms = [torch.randperm(d, generator=g_perm) for _ in range(3)]
    for e, perm in zip(stream, perms, strict=True):
        idx = torch.randperm(n, generator=g_sub)[:500].sort().values
        for x, samples in ((mnist.x_train[idx], e.train), (mnist.x_test, e.test)):
            whole = x.reshape(x.shape[0], d)[:, perm].reshape(x.shape)
            assert torch.equal(fetched_in_batches(stream, samples), whole)
            rows = torch.arange(7, 40)
            assert torch.equal(samples.fetch(rows), whole[rows])


def test_rotated_per_batch_equals_the_whole_set_rotation(mnist):
    """Rotation per fetched batch, background = the training set's minimum per channel: the values of
    rotating the whole set at once."""
    stream = rotated(mnist, 0, n_experiences=3, max_angle=60.0, train_samples=300)
    fill = mnist.x_train.amin(dim=(0, 2, 3))
    g_sub = torch.Generator().manual_seed(1)
    for e, angle in zip(stream, [0.0, 30.0, 60.0], strict=True):
        idx = torch.randperm(mnist.y_train.shape[0], generator=g_sub)[:300].sort().values
        for x, samples in ((mnist.x_train[idx], e.train), (mnist.x_test, e.test)):
            assert torch.equal(fetched_in_batches(stream, samples), rotate(x, angle, fill))
