"""The data layer at scale: memory, speed and determinism of file-backed and uint8 in-memory streams.

    python experiments/bench_data.py files        # 30,000 224x224 JPEGs, 200 classes, 10 experiences
    python experiments/bench_data.py inmemory     # CIFAR-100-shaped (50,000 3x32x32), uint8 vs float
    python experiments/bench_data.py determinism  # 0/2/4 loader workers, kill -9 + --resume, file-backed
    python experiments/bench_data.py all          [--work DIR] [--images 30000] [--repeats 3]

files: one `cltoolbox run` (ER, 2,000 samples replayed by key, one epoch, 2 loader workers) over the
generated tree reports the peak RSS of the training process and of its largest worker (target: <= 2.5 GB).
Then one epoch over the first experience's files, timed side by side (alternating, median of --repeats)
against a hand-written torchvision DataLoader loop over the same files with the same workers, model,
batch size and optimiser (target: <= 1.1x).

inmemory: CIFAR-100 files in the real pickle format (random pixels) under --work. The same run with the
code before the data layer (commit f338fbc, float32 tensors; checked out into a git worktree) and with
this code (uint8): peak RSS (target: uint8 <= 1/3 of float). Then one epoch of the first experience
timed side by side: the old code's float path, this code's float path, this code's uint8 path
(target: uint8 <= 1.05x the old float path).

determinism: byte-identical accuracy.csv with 0, 2 and 4 workers, and after kill -9 + --resume.

Wall and CPU time (the process and its loader workers) are printed side by side; torch uses one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from synthetic_images import make_image_folder  # noqa: E402

BASE_COMMIT = "f338fbc"  # the last commit before the data layer: float32 tensors held whole


def cpu_s() -> float:
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def run_cli(cfg: dict, out: Path, pythonpath: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One `cltoolbox run` in a fresh process; returns the run's metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    cmd = [sys.executable, "-m", "cltoolbox.cli", "run", str(path), "--out", str(out / "runs"), "--threads", "1",
           "-q", "--overwrite", *extra]
    subprocess.run(cmd, check=True, env=env, cwd=pythonpath or REPO)
    (metrics,) = (out / "runs").glob("*/*/*/seed_*/metrics.json")
    return json.loads(metrics.read_text())


def accuracy_csv(out: Path) -> bytes:
    (path,) = (out / "runs").glob("*/*/*/seed_*/accuracy.csv")
    return path.read_bytes()


# -- file-backed -------------------------------------------------------------------------------------------
def files_config(root: Path, workers: int, **train) -> dict:
    return {
        "name": "bench_files",
        "scenario": {"name": "class_incremental", "dataset": "image_folder", "root": str(root), "n_experiences": 10},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": {"name": "er", "memory_size": 2000},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "workers": workers, **train},
        "seeds": [0],
    }


class _Files:
    """The hand-written side: a map-style dataset decoding each file with torchvision, as users write it."""

    def __init__(self, paths: list[str], labels: list[int], size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms.v2 import functional as TF

        img = decode_image(read_file(self.paths[i]), mode=ImageReadMode.RGB)
        return TF.resize(img, [self.size, self.size], antialias=True), self.labels[i]


def time_files_epoch(root: Path, workers: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from cltoolbox.data import load_dataset
    from cltoolbox.loop import Learner, TrainConfig
    from cltoolbox.registry import MODELS, SCENARIOS

    torch.set_num_threads(1)
    data = load_dataset("image_folder", str(root))
    stream = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=10)
    exp = stream[0]
    src = exp.train.source
    paths = [src.paths[i] for i in exp.train.index.tolist()]
    labels = exp.train.y.tolist()
    size = src.sample_shape[-1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    make = lambda: MODELS.get("mlp").factory(stream.input_shape, stream.n_classes, hidden=[64])  # noqa: E731

    def ours() -> None:
        torch.manual_seed(0)
        learner = Learner(make(), [], TrainConfig(epochs=1, batch_size=32, lr=0.01, workers=workers), seed=0)
        learner.begin(stream)
        learner.experience = exp
        learner.train_data(stream.keys(exp.train), exp.train.y, torch.zeros_like(exp.train.y))

    def hand() -> None:
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(_Files(paths, labels, size), batch_size=32, shuffle=True,
                                             generator=torch.Generator().manual_seed(0), num_workers=workers,
                                             prefetch_factor=4 if workers else None)
        for x, y in loader:
            x = x.float().div_(255).sub_(mean).div_(std)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    side_by_side({"hand-written DataLoader loop": hand, "cltoolbox (file-backed)": ours}, repeats,
                 f"one epoch over {len(paths)} files of experience 0 ({size}x{size}, {workers} workers)")


def side_by_side(fns: dict, repeats: int, what: str) -> dict[str, float]:
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # alternating: drift on a busy machine hits both sides alike
            w, c = time.perf_counter(), cpu_s()
            fn()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(cpu_s() - c)
    print(f"\n{what}; median of {repeats}, alternating")
    first = next(iter(fns))
    for name in fns:
        ratio = statistics.median(walls[name]) / statistics.median(walls[first])
        cpu_ratio = statistics.median(cpus[name]) / statistics.median(cpus[first])
        print(f"  {name:34s} wall {statistics.median(walls[name]):7.2f} s  cpu {statistics.median(cpus[name]):7.2f} s"
              f"  ratio to first: wall {ratio:.3f}, cpu {cpu_ratio:.3f}")
    return {k: statistics.median(v) for k, v in walls.items()}


def files(work: Path, images: int, repeats: int) -> None:
    root = make_image_folder(work / "image_folder_224", classes=200, train=images, test=images // 10)
    print(f"dataset: {images} training + {images // 10} test JPEGs, 224x224, 200 classes, under {root}")
    r = peak_rss(files_config(root, workers=2), work / "files_run")
    (path,) = (work / "files_run" / "runs").glob("*/*/*/seed_*/metrics.json")
    m = json.loads(path.read_text())
    c = m["cost"]
    print(f"\nfile-backed run (ER 2000 by key, 10 experiences, 1 epoch, 2 workers): wall {c['wall_s']:.0f} s, "
          f"cpu {c['cpu_s']:.0f} s (training process), train {c['train_s']:.0f} s, eval {c['eval_s']:.0f} s\n"
          f"  peak RSS: training process {r['peak']:.0f} MB (target <= 2500 MB; {r['base']:.0f} MB once torch and "
          f"cltoolbox are imported), largest loader worker {r['workers']:.0f} MB (shares pages with the "
          f"training process)\n  memory_bytes {c['memory_bytes'] / 1e6:.0f} MB at native size (held as keys); "
          f"final ACC class-IL {m['class_il']['acc']:.3f}")
    time_files_epoch(root, 2, repeats)


# -- in memory ---------------------------------------------------------------------------------------------
def write_cifar100(root: Path) -> Path:
    """CIFAR-100 in its real on-disk format (python pickles of uint8 rows), random pixels; made once."""
    folder = root / "cifar-100-python"
    if (folder / "test").exists():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 50_000), ("test", 10_000)):
        labels = np.repeat(np.arange(100), n // 100)
        rng.shuffle(labels)
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": labels.tolist(),
                 "coarse_labels": (labels // 5).tolist(), "filenames": [f"{i}.png" for i in range(n)],
                 "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


def base_tree(work: Path) -> Path:
    """The code before the data layer, checked out once (strategies/scenarios linked where the package expects
    them, so the editable install's mapping to this checkout's files does not apply)."""
    tree = work / f"cltoolbox-{BASE_COMMIT}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BASE_COMMIT], check=True)
        for sub in ("strategies", "scenarios"):
            (tree / "cltoolbox" / sub).symlink_to(Path("..") / sub)
    return tree


def inmemory_config(root: Path) -> dict:
    return {
        "name": "bench_inmemory",
        "scenario": {"name": "class_incremental", "dataset": "cifar100", "root": str(root), "n_experiences": 10},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": {"name": "naive"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01},
        "seeds": [0],
    }


EPOCH_SNIPPET = """
import sys, time, resource, torch
from cltoolbox.data import load_dataset
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.registry import MODELS, SCENARIOS
torch.set_num_threads(1)
root, kind, model_name = sys.argv[1], sys.argv[2], sys.argv[3]
data = load_dataset("cifar100", root)
if kind == "new-float":  # this code's float path: the same normalised float32 tensors the old code held
    from cltoolbox.data.base import Dataset
    data = Dataset.from_tensors("cifar100", data.x_train, data.y_train, data.x_test, data.y_test, 100)
stream = SCENARIOS.get("class_incremental").factory(data, 0, n_experiences=10)
exp = stream[0]
params = {"hidden": [400, 400]} if model_name == "mlp" else {}
torch.manual_seed(0)
learner = Learner(MODELS.get(model_name).factory(stream.input_shape, 100, **params), [],
                  TrainConfig(epochs=1, batch_size=32, lr=0.01), seed=0)
learner.begin(stream)
learner.experience = exp
data_arg = exp.x_train if kind == "old-float" else stream.keys(exp.train)
t = torch.zeros_like(exp.y_train)
w, c = time.perf_counter(), time.process_time()
learner.train_data(data_arg, exp.y_train, t)
print(time.perf_counter() - w, time.process_time() - c)
"""


RSS_SNIPPET = """
import json, resource, sys, torch
import cltoolbox, cltoolbox.runner, cltoolbox.strategies, cltoolbox.scenarios
def vm_hwm_mb():  # this process's own peak (ru_maxrss would carry over the forking parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
torch.set_num_threads(1)
base = vm_hwm_mb()
cltoolbox.run(sys.argv[1], out=sys.argv[2], quiet=True, overwrite=True)
print(json.dumps({"base": base, "peak": vm_hwm_mb(),
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def peak_rss(cfg: dict, out: Path, tree: Path | None = None) -> dict:
    """Peak RSS (VmHWM) of one run in a fresh process, its RSS once every module is imported (the baseline),
    and the largest loader worker's peak RSS (pages it shares with the training process included)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(tree) if tree else ""}
    res = subprocess.run([sys.executable, "-c", RSS_SNIPPET, str(out / "config.yaml"), str(out / "runs")], env=env,
                         cwd=str(tree or REPO), check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def inmemory(work: Path, repeats: int) -> None:
    root = write_cifar100(work / "cifar100")
    old = base_tree(work)
    cfg = inmemory_config(root)
    r_old = peak_rss(cfg, work / "inmemory_old", old)
    r_new = peak_rss(cfg, work / "inmemory_new")
    above_old, above_new = r_old["peak"] - r_old["base"], r_new["peak"] - r_new["base"]
    print(f"\nCIFAR-100-shaped run (naive, 10 experiences, 1 epoch, one process each):\n"
          f"  peak RSS          float32 (before) {r_old['peak']:6.0f} MB  uint8 (now) {r_new['peak']:6.0f} MB  "
          f"ratio {r_new['peak'] / r_old['peak']:.3f} (target <= 0.333)\n"
          f"  after imports     float32 (before) {r_old['base']:6.0f} MB  uint8 (now) {r_new['base']:6.0f} MB  "
          f"(torch, cltoolbox and its plugins imported, nothing loaded)\n"
          f"  above that        float32 (before) {above_old:6.0f} MB  uint8 (now) {above_new:6.0f} MB  "
          f"ratio {above_new / above_old:.3f}")
    for model in ("mlp", "resnet18_reduced"):
        walls: dict[str, list[float]] = {k: [] for k in ("old-float", "new-float", "new-uint8")}
        cpus: dict[str, list[float]] = {k: [] for k in walls}
        for _ in range(repeats):
            for kind in walls:
                env = {**os.environ, "PYTHONPATH": str(old) if kind == "old-float" else ""}
                res = subprocess.run([sys.executable, "-c", EPOCH_SNIPPET, str(root), kind, model], env=env,
                                     cwd=str(old) if kind == "old-float" else REPO, check=True,
                                     capture_output=True, text=True)
                wall, cpu = map(float, res.stdout.split())
                walls[kind].append(wall)
                cpus[kind].append(cpu)
        base, base_cpu = statistics.median(walls["old-float"]), statistics.median(cpus["old-float"])
        print(f"\none epoch of experience 0 (5,000 CIFAR-100-shaped images, batch 32, {model}); median of {repeats}")
        for kind in walls:
            w, c = statistics.median(walls[kind]), statistics.median(cpus[kind])
            print(f"  {kind:10s} wall {w:7.2f} s  cpu {c:7.2f} s  ratio to old-float: wall {w / base:.3f}, "
                  f"cpu {c / base_cpu:.3f} (target <= 1.05)")


# -- determinism -------------------------------------------------------------------------------------------
SMALL_IMAGES_PLUGIN = """
from cltoolbox.data.catalogue import load_image_folder
from cltoolbox.registry import register_dataset


@register_dataset("image_folder_32px")
def image_folder_32px(root: str | None = None, download: bool = False):
    return load_image_folder(root, name="image_folder_32px", resize=32, crop=32)
"""


def determinism_config(work: Path, root: Path, workers: int) -> dict:
    """ER by key with seeded augmentation on a file-backed 32 px tree (a dataset plugin sets the size)."""
    plugin = work / "image_folder_32px.py"
    plugin.write_text(SMALL_IMAGES_PLUGIN)
    cfg = files_config(root, workers, epochs=3, augment_crop=4, augment_hflip=True)
    cfg["imports"] = [str(plugin)]
    cfg["model"] = {"name": "resnet18_reduced", "nf": 8}
    cfg["scenario"].update(dataset="image_folder_32px", n_experiences=5)
    return cfg


def determinism(work: Path) -> None:
    root = make_image_folder(work / "image_folder_32", classes=20, train=1200, test=400, size=32)
    results = {}
    for w in (0, 2, 4):
        run_cli(determinism_config(work, root, w), work / f"det_w{w}")
        results[w] = accuracy_csv(work / f"det_w{w}")
    same = all(results[w] == results[0] for w in results)
    print(f"\naccuracy.csv with 0, 2, 4 workers (ER by key, augmentation, 5 experiences): "
          f"{'byte-identical' if same else 'DIFFERENT'}")
    # kill -9 mid-run (after the first checkpoint), then --resume: same bytes as the uninterrupted run
    out = work / "det_kill"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(determinism_config(work, root, 2)))
    cmd = [sys.executable, "-m", "cltoolbox.cli", "run", str(out / "config.yaml"), "--out", str(out / "runs"),
           "--threads", "1", "-q", "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "runs").glob("*/*/*/seed_*/checkpoint/state.pt")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers
    proc.wait()
    (run_dir,) = (out / "runs").glob("*/*/*/seed_*")
    killed_at = "after finishing" if (run_dir / "DONE").exists() else "mid-run"
    subprocess.run([*cmd[:-1], "--resume"], check=True, cwd=REPO)
    same = accuracy_csv(out) == results[2]
    print(f"kill -9 ({killed_at}) then --resume, 2 workers: accuracy.csv "
          f"{'byte-identical' if same else 'DIFFERENT'} to the uninterrupted run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("files", "inmemory", "determinism", "all"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/cltoolbox-bench-data"))
    ap.add_argument("--images", type=int, default=30_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.what in ("files", "all"):
        files(a.work, a.images, a.repeats)
    if a.what in ("inmemory", "all"):
        inmemory(a.work, a.repeats)
    if a.what in ("determinism", "all"):
        determinism(a.work)


if __name__ == "__main__":
    main()
