"""train.augment_crop / augment_hflip: the crops and flips themselves, config errors, and training with them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import cltoolbox
from cltoolbox.augment import make_augment
from cltoolbox.build import build_stream
from cltoolbox.config import validate
from cltoolbox.data import load_dataset
from cltoolbox.data.source import TensorSource
from cltoolbox.errors import ConfigError
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.models.mlp import mlp
from cltoolbox.plugin import Plugin
from cltoolbox.registry import STRATEGIES


def _windows(padded: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    H, W = padded.shape[-2:]
    return [padded[:, oy : oy + h, ox : ox + w] for oy in range(H - h + 1) for ox in range(W - w + 1)]


def test_each_sample_is_a_window_of_its_black_padded_image_maybe_flipped() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, 7, generator=gen)
    y = torch.zeros(20, dtype=torch.long)
    aug = make_augment(2, True, [TensorSource(x[:20], y, "a"), TensorSource(x[20:], y, "b")])
    assert torch.equal(aug.fill, x.transpose(0, 1).reshape(3, -1).amin(1))  # each channel's black
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    flipped = shifted = 0
    for i in range(len(x)):
        padded = aug.fill.view(3, 1, 1).expand(3, 9, 11).clone()
        padded[:, 2:7, 2:9] = x[i]
        plain = [k for k, win in enumerate(_windows(padded, 5, 7)) if torch.equal(win, out[i])]
        mirrored = [k for k, win in enumerate(_windows(padded, 5, 7)) if torch.equal(win.flip(-1), out[i])]
        assert plain or mirrored, f"sample {i} is no window of its padded image"
        flipped += not plain
        shifted += (plain or mirrored)[0] != 12  # 12: the centred window (offset 2, 2)
    assert 10 <= flipped <= 30 and shifted >= 30  # about half flipped; 24 of 25 offsets move the image


def test_flip_alone_keeps_every_pixel_and_the_same_seed_repeats() -> None:
    x = torch.randn(64, 1, 4, 4)
    source = TensorSource(x, torch.zeros(64, dtype=torch.long), "x")
    aug = make_augment(0, True, [source])
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    same = [(torch.equal(a[i], x[i]), torch.equal(a[i], x[i].flip(-1))) for i in range(64)]
    assert all(s or f for s, f in same) and 0 < sum(f for _, f in same) < 64
    assert make_augment(0, False, [source]) is None  # both off: no augmentation at all


BASE = {
    "name": "aug",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 3,
                 "first_classes": 4, "classes_per_exp": 3},
    "model": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "augment_crop": 1, "augment_hflip": True},
    "seeds": [0],
}


@pytest.mark.parametrize(("changes", "message"), [
    ({"train": {"augment_crop": -1}}, r"^train.augment_crop: must be >= 0"),
    ({"train": {"augment_crop": 8}}, r"^train.augment_crop: padding 8 is not smaller than the 8x8 images"),
    ({"scenario": {"name": "class_incremental", "dataset": "mnist1d", "n_experiences": 5}},
     r"^train.augment_crop: needs image inputs .* are \(40,\)"),
    ({"train": {"augment_crop": 0, "augment_hflip": False},
      "strategy": [{"name": "naive", "train": {"augment_hflip": True}}],
      "scenario": {"name": "class_incremental", "dataset": "mnist1d", "n_experiences": 5}},
     r"^strategy\[0\].train.augment_hflip: needs image inputs"),
])
def test_bad_augmentation_fails_before_any_run(changes: dict, message: str, tmp_path: Path) -> None:
    config = copy.deepcopy(BASE)
    for key, value in changes.items():
        config[key] = {**config[key], **value} if key == "train" else value
    with pytest.raises(ConfigError, match=message):
        cltoolbox.run({**config, "out": str(tmp_path)}, quiet=True)
    assert not any(tmp_path.iterdir())


class _SeesModelInput(Plugin):
    """Records, per step, whether the model's input differs from the batch and the batch comes from the data."""

    def __init__(self, data: torch.Tensor) -> None:
        self.rows = {tuple(r.tolist()) for r in data.flatten(1)}
        self.augmented = self.from_data = 0

    def loss(self, learner, batch, logits):
        x = learner.model_input(batch.x)
        self.augmented += x.shape == batch.x.shape and not torch.equal(x, batch.x)
        self.from_data += all(tuple(r.tolist()) in self.rows for r in batch.x.flatten(1))
        return 0.0


def test_the_model_trains_on_augmented_inputs_while_batches_and_memories_stay_data() -> None:
    resolved = validate(copy.deepcopy(BASE))
    stream = build_stream(resolved, load_dataset("digits"), 0)
    torch.manual_seed(0)
    probe = _SeesModelInput(torch.cat([e.x_train for e in stream.experiences]))
    # DER forwards a memory batch in its loss hook, before the probe's: the batch's augmentation is still known
    der = STRATEGIES.get("der").factory(memory_size=60)
    learner = Learner(mlp(stream.input_shape, stream.n_classes, hidden=[32]), [*der, probe],
                      TrainConfig(**resolved["train"]), seed=0)
    learner.fit(stream)
    steps = learner.step
    assert probe.augmented == steps and probe.from_data == steps
    memory = der[0].memory  # keys of the stream samples, whose inputs are the data, never their augmentations
    stored = stream.fetch(memory.key[: memory.size])
    assert memory.size == 60 and all(tuple(r.tolist()) in probe.rows for r in stored.flatten(1))


def test_runs_with_augmentation_are_reproducible_and_differ_from_plain_ones(tmp_path: Path) -> None:
    strategies = [{"name": n} for n in ("naive", "er", "der", "lwf", "icarl")]
    runs = []
    for label, train in (("a", {}), ("b", {}), ("plain", {"augment_crop": 0, "augment_hflip": False})):
        config = {**copy.deepcopy(BASE), "strategy": strategies, "out": str(tmp_path / label)}
        config["train"].update(train)
        runs.append(cltoolbox.run(config, quiet=True))
    for a, b, plain in zip(*runs, strict=True):
        acc = [(Path(r["run_dir"]) / "accuracy.csv").read_bytes() for r in (a, b, plain)]
        assert acc[0] == acc[1] and acc[0] != acc[2], Path(a["run_dir"]).name


@pytest.mark.slow
def test_random_crops_improve_an_overfitting_mlp_on_real_digits(tmp_path: Path) -> None:
    # experiments/augment_mnist5k.yaml for one seed: 30 epochs on 4,000 MNIST digits overfit a 2x400 MLP;
    # 2-pixel random shifts generalise better (measured 0.968 vs 0.951)
    config = cltoolbox.config.load_yaml(Path(__file__).parents[1] / "experiments" / "augment_mnist5k.yaml")
    config.update(seeds=[0], out=str(tmp_path))
    plain, crop = (r["class_il"]["acc"] for r in cltoolbox.run(config, quiet=True))
    assert crop > plain + 0.005, (plain, crop)


def test_augmented_batches_bypass_the_frozen_feature_cache() -> None:
    from cltoolbox.models.vit import vit

    resolved = validate(copy.deepcopy(BASE))
    stream = build_stream(resolved, load_dataset("digits"), 0)
    torch.manual_seed(0)
    model = vit(stream.input_shape, stream.n_classes, patch_size=4, embed_dim=16, depth=1, num_heads=2, frozen=True)
    learner = Learner(model, STRATEGIES.get("naive").factory(), TrainConfig(**resolved["train"]), seed=0)
    learner.fit(stream)
    assert len(model.cache) == 0 and model.cache.misses == 0  # training saw augmented images only: not cached
    n_test = sum(e.n_test for e in stream.eval_experiences)
    learner.logits(torch.cat([e.x_test for e in stream.eval_experiences]), torch.zeros(n_test, dtype=torch.long))
    assert len(model.cache) == n_test  # evaluation still caches its (fixed) images


def test_a_killed_augmented_run_resumes_to_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    from cltoolbox import session

    config = {**copy.deepcopy(BASE), "strategy": [{"name": "der", "memory_size": 50}]}
    cltoolbox.run({**config, "out": str(tmp_path / "whole")}, quiet=True)
    real_eval = session.evaluate_stream

    def crash_in_experience_2(learner, stream, row, history) -> None:
        if row == 2:
            raise KeyboardInterrupt
        real_eval(learner, stream, row, history)

    monkeypatch.setattr(session, "CHECKPOINT_WORK_RATIO", 0)  # a checkpoint after every experience
    monkeypatch.setattr(session, "evaluate_stream", crash_in_experience_2)
    with pytest.raises(KeyboardInterrupt):
        cltoolbox.run({**config, "out": str(tmp_path / "killed")}, quiet=True)
    monkeypatch.setattr(session, "evaluate_stream", real_eval)
    cltoolbox.run({**config, "out": str(tmp_path / "killed")}, resume=True, quiet=True)
    (whole,) = [p.parent for p in (tmp_path / "whole").rglob("DONE")]
    (killed,) = [p.parent for p in (tmp_path / "killed").rglob("DONE")]
    for name in ("accuracy.csv", "per_class.csv", "train_log.csv"):
        a, b = ((d / name).read_text().splitlines() for d in (whole, killed))
        if name == "train_log.csv":  # samples_per_s is a timing
            a, b = ([line.rsplit(",", 1)[0] for line in lines] for lines in (a, b))
        assert a == b, name
