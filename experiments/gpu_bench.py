"""GPU benchmark (issue 12): cltoolbox vs a hand-written GPU loop vs Avalanche 0.6.0, precision, the frozen-feature
cache and DDP, side by side in one run, printing ``ratio`` lines.

    python experiments/gpu_bench.py                          # CUDA; about 8 minutes on one H100
    python experiments/gpu_bench.py --root ~/data            # real CIFAR-100 when ROOT/cifar-100-python exists
    python experiments/gpu_bench.py --device cpu --tiny      # every section in seconds (the test suite runs it)
    python experiments/gpu_bench.py --sections resnet        # one section: resnet, vit, ddp

Sections (one epoch of a 10-experience class-incremental stream; training time only: no evaluation, no run
folder; CUDA synchronised before each clock read):

* ``resnet``: ResNet-18 reduced (nf=20) and full (nf=64) on CIFAR-100-shaped data (3x32x32 uint8: real CIFAR-100
  from ``--root``, else generated images: a class pattern plus noise, ``--train-size`` of them), naive and ER
  (reservoir, memory 2,000, a memory batch as large as the stream batch), batch 32 and 128, SGD lr 0.03:
  cltoolbox (the Learner, data resident on the device as uint8) vs a hand-written loop (the same uint8 data on
  the device, index, normalise, forward, backward, ``torch.optim.SGD``; ER with a vectorised reservoir on the
  device) vs Avalanche 0.6.0 (``Naive`` / ``Replay(mem_size=2000)`` on a tensor dataset of the normalised
  float images, its default loader). cltoolbox and the hand loop run in fp32 and bf16 autocast; Avalanche in fp32.
* ``vit``: ViT-B/16 (timm ``vit_base_patch16_224``, random weights) at 224 px on generated images: L2P and
  SimpleCIL with the frozen-feature cache (the default) vs without it (``cltoolbox.models.cache.uncached``).
* ``ddp``: ``cltoolbox run --nproc N`` for N = 1 and all visible GPUs (CPU: 2 gloo processes) on the full
  ResNet-18 naive config, batch 128 (the global batch); time = the runs' own ``train_s`` from metrics.json.

Ratios printed: cltoolbox / hand-written (target <= 1.1), Avalanche / cltoolbox (target >= 1.5), bf16 / fp32,
uncached / cached, 1 process / N processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cltoolbox import config as cfgmod
from cltoolbox.build import build_model, build_plugins, build_stream
from cltoolbox.data.base import Dataset
from cltoolbox.registry import DATASETS, register_dataset

HERE = Path(__file__).resolve()
DATASET = "gpu_bench_images"
# generated images' shape, read by the dataset factory (also in the processes that `cltoolbox run --nproc` starts)
SHAPE_ENV = "CLTOOLBOX_GPU_BENCH_SHAPE"  # "n_train,n_test,n_classes,side"
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MEMORY, LR = 2000, 0.03


def generated(n_train: int, n_test: int, n_classes: int, side: int, seed: int = 0) -> Dataset:
    """uint8 images: a smooth per-class pattern plus per-sample noise (learnable, so accuracies mean something)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % n_classes
        x = torch.empty(n, 3, side, side, dtype=torch.uint8)
        chunk = max(1, 2**24 // (3 * side * side))  # ~64 MB of float noise at a time, whatever the image size
        for s in range(0, n, chunk):
            yy = y[s : s + chunk]
            noise = torch.rand(len(yy), 3, side, side, generator=g)
            x[s : s + chunk] = ((0.6 * patterns[yy] + 0.4 * noise) * 255).round().to(torch.uint8)
        return x, y

    (xt, yt), (xe, ye) = make(n_train), make(n_test)
    return Dataset.from_tensors(DATASET, xt, yt, xe, ye, n_classes, CIFAR_MEAN, CIFAR_STD)


@register_dataset(DATASET, override=True)
def gpu_bench_images(root: str | None = None, download: bool = False) -> Dataset:
    """CIFAR-100-shaped benchmark images: real CIFAR-100 under root, else generated uint8 images (gpu_bench.py)."""
    if root:
        return DATASETS.get("cifar100").factory(root, False)
    n_train, n_test, n_classes, side = (int(v) for v in os.environ.get(SHAPE_ENV, "50000,10000,100,32").split(","))
    return generated(n_train, n_test, n_classes, side)


# -- clocks -----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def clock(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    sync(device)
    out["wall"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0


# -- the three sides ------------------------------------------------------------------------------------------
def resolved(model: dict, strategy: dict, batch: int, device: torch.device, precision: Any, root: str | None,
             n_classes: int) -> dict:
    return cfgmod.validate({
        "name": "gpu_bench", "scenario": {"name": "class_incremental", "dataset": DATASET, "root": root,
                                          "n_experiences": 10 if n_classes >= 10 else 2},
        "model": model, "strategy": strategy, "seeds": [0],
        "train": {"epochs": 1, "batch_size": batch, "lr": LR, "device": str(device), "precision": precision,
                  "eval_batch_size": 256}})


def run_cltoolbox(cfg: dict, data: Dataset, device: torch.device, cached: bool = True) -> dict[str, float]:
    """The Learner on the stream (data on the device), one epoch per experience; training time, final ACC."""
    from cltoolbox.evaluate import History, evaluate_stream
    from cltoolbox.loop import Learner
    from cltoolbox.models.cache import uncached

    run_cfg = cfgmod.run_config(cfg, cfg["strategy"][0], 0)
    stream = build_stream(run_cfg, data, 0)
    torch.manual_seed(0)
    learner = Learner(build_model(run_cfg, stream), build_plugins(run_cfg["strategy"]), cfgmod.train_config(run_cfg))
    stream = stream.to(learner.device)
    out: dict[str, float] = {}
    with clock(device, out), (contextlib.nullcontext() if cached else uncached()):
        learner.fit(stream)
    history = History(len(stream), stream.n_classes, len(stream.eval_experiences))
    evaluate_stream(learner, stream, len(stream) - 1, history)
    out["acc"] = float(history.matrix("class_il")[-1].mean())
    return out


def run_hand(cfg: dict, data: Dataset, device: torch.device, replay: bool) -> dict[str, float]:
    """The same work written by hand for a GPU: uint8 images on the device, per batch an index, a normalise, the
    model's forward and backward and torch's SGD step; ER: memory indices on the device, a vectorised reservoir."""
    run_cfg = cfgmod.run_config(cfg, cfg["strategy"][0], 0)
    stream = build_stream(run_cfg, data, 0)
    torch.manual_seed(0)
    model = build_model(run_cfg, stream).to(device)
    src = data.train.to(device)
    x_all, y_all = src.x, src.labels
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
    dtype = {"bf16": torch.bfloat16}.get(cfg["train"]["precision"])
    bs = cfg["train"]["batch_size"]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator(device=device).manual_seed(0)
    memory = torch.empty(MEMORY, dtype=torch.long, device=device)
    seen = 0
    out: dict[str, float] = {}
    with clock(device, out):
        model.train()
        for exp in stream:
            assert exp.train.source is data.train, "the hand loop indexes the dataset's own training tensor"
            idx_exp = exp.train.index.to(device)  # positions of this experience's samples in the train tensor
            order = idx_exp[torch.randperm(len(idx_exp), device=device, generator=g)]
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                if replay and seen > 0:
                    mem = memory[torch.randint(min(seen, MEMORY), (len(idx),), device=device, generator=g)]
                    rows = torch.cat((idx, mem))
                else:
                    rows = idx
                x = (x_all.index_select(0, rows).float().div_(255) - mean) / std
                y = y_all.index_select(0, rows)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if replay:  # reservoir: sample number p (0-based) replaces slot u ~ U[0, p] when u < MEMORY
                    pos = torch.arange(seen, seen + len(idx), device=device)
                    slot = (torch.rand(len(idx), device=device, generator=g) * (pos + 1)).long()
                    slot = torch.where(pos < MEMORY, pos, slot)
                    keep = slot < MEMORY
                    memory.index_copy_(0, slot[keep], idx[keep])
                    seen += len(idx)
    model.eval()
    with torch.no_grad():
        accs = []
        te = data.test.to(device)
        for e in stream:
            rows = e.test.index.to(device)
            x = (te.x.index_select(0, rows).float().div_(255) - mean) / std
            accs.append(float((model(x).argmax(1) == te.labels.index_select(0, rows)).float().mean()))
    out["acc"] = sum(accs) / len(accs)
    return out


def run_avalanche(cfg: dict, data: Dataset, device: torch.device, replay: bool) -> dict[str, float]:
    """Avalanche 0.6.0's Naive / Replay(mem_size=2000) on the same stream (same class order), same model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import avalanche.training as tr
        from avalanche.benchmarks import nc_benchmark
        from avalanche.training.plugins import EvaluationPlugin

        from cltoolbox.interop.avalanche import TensorPairs

    run_cfg = cfgmod.run_config(cfg, cfg["strategy"][0], 0)
    stream = build_stream(run_cfg, data, 0)
    xt = data.train.fetch(torch.arange(len(data.train.labels)))  # normalised float images, on the CPU
    xe = data.test.fetch(torch.arange(len(data.test.labels)))
    torch.manual_seed(0)
    model = build_model(run_cfg, stream)
    out: dict[str, float] = {}
    # record, not print: Avalanche re-enables its DeprecationWarnings inside its own calls
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        bm = nc_benchmark(TensorPairs(xt, data.train.labels), TensorPairs(xe, data.test.labels),
                          n_experiences=len(stream), task_labels=False, shuffle=False,
                          fixed_class_order=[int(c) for c in stream.class_order])
        kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg["train"]["batch_size"], train_epochs=1,
                  eval_mb_size=256, device=device, evaluator=EvaluationPlugin(loggers=[]))
        strategy = tr.Replay(mem_size=MEMORY, **kw) if replay else tr.Naive(**kw)
        with clock(device, out):
            for exp in bm.train_stream:
                strategy.train(exp)
    model.eval()
    with torch.no_grad():
        accs = []
        for e in stream:
            rows = e.test.index
            x = xe.index_select(0, rows).to(device)
            accs.append(float((model(x).argmax(1).cpu() == data.test.labels.index_select(0, rows)).float().mean()))
    out["acc"] = sum(accs) / len(accs)
    return out


# -- sections -------------------------------------------------------------------------------------------------
ROWS: list[tuple[str, str]] = []  # (what, measurement) for the closing Markdown table


def show(label: str, r: dict[str, float]) -> None:
    ROWS.append((label, f"{r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, ACC {r['acc']:.3f}"))
    print(f"  {label:58} {r['wall']:8.2f} s wall {r['cpu']:8.2f} s CPU   ACC {r['acc']:.3f}", flush=True)


def ratio(name: str, a: float, b: float, target: str = "") -> None:
    ROWS.append((f"ratio {name}", f"{a / max(b, 1e-9):.2f}{f' (target {target})' if target else ''}"))
    print(f"ratio {name} = {a / max(b, 1e-9):.2f}{f'   (target {target})' if target else ''}", flush=True)


def section_resnet(args: argparse.Namespace, device: torch.device, data: Dataset, n_classes: int) -> None:
    models = [("resnet18_reduced", {"name": "resnet18_reduced", "nf": 20}),
              ("resnet18", {"name": "resnet18_reduced", "nf": 64})]
    if args.tiny:
        models = [("resnet18_reduced", {"name": "resnet18_reduced", "nf": 4})]
    for label, model in models:
        for strategy in ("naive", "er"):
            for batch in args.batches:
                spec = {"name": "naive"} if strategy == "naive" else {"name": "er", "memory_size": MEMORY}
                res = {}
                for prec in (32, "bf16"):
                    cfg = resolved(model, spec, batch, device, prec, args.root, n_classes)
                    res[("ours", prec)] = run_cltoolbox(cfg, data, device)
                    res[("hand", prec)] = run_hand(cfg, data, device, strategy == "er")
                    show(f"{label} {strategy} b{batch} {prec}: cltoolbox", res[("ours", prec)])
                    show(f"{label} {strategy} b{batch} {prec}: hand-written", res[("hand", prec)])
                if not args.no_avalanche:
                    cfg = resolved(model, spec, batch, device, 32, args.root, n_classes)
                    res["av"] = run_avalanche(cfg, data, device, strategy == "er")
                    show(f"{label} {strategy} b{batch} 32: avalanche", res["av"])
                tag = f"{label} {strategy} b{batch}"
                for prec in (32, "bf16"):
                    ratio(f"cltoolbox/hand {tag} {prec}", res[("ours", prec)]["wall"], res[("hand", prec)]["wall"],
                          "<= 1.1")
                if "av" in res:
                    ratio(f"avalanche/cltoolbox {tag} 32", res["av"]["wall"], res[("ours", 32)]["wall"], ">= 1.5")
                ratio(f"bf16/fp32 cltoolbox {tag}", res[("ours", "bf16")]["wall"], res[("ours", 32)]["wall"])


def section_vit(args: argparse.Namespace, device: torch.device) -> None:
    if args.tiny:
        n_train, n_test, n_classes, side = 80, 40, 4, 16
        model = {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
    else:
        n_train, n_test, n_classes, side = args.vit_train_size, args.vit_train_size // 4, 10, 224
        model = {"name": "vit", "arch": "vit_base_patch16_224", "pretrained": False}
    data = generated(n_train, n_test, n_classes, side)
    for strategy in ({"name": "l2p"}, {"name": "simplecil"}):
        res = {}
        for prec in ((32, "bf16") if device.type == "cuda" else (32,)):
            cfg = resolved(model, strategy, 32, device, prec, None, n_classes)
            for cached in (True, False):
                res[(prec, cached)] = r = run_cltoolbox(cfg, data, device, cached=cached)
                arch = "vit-tiny" if args.tiny else "vit-b16"
                show(f"{arch} {strategy['name']} b32 {prec} {'cached' if cached else 'uncached'}", r)
            ratio(f"uncached/cached vit {strategy['name']} {prec}", res[(prec, False)]["wall"],
                  res[(prec, True)]["wall"])


def section_ddp(args: argparse.Namespace, device: torch.device, n_classes: int) -> None:
    nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    model = {"name": "resnet18_reduced", "nf": 4 if args.tiny else 64}
    cfg = {"name": "gpu_bench_ddp", "imports": [str(HERE)],
           "scenario": {"name": "class_incremental", "dataset": DATASET, "root": args.root,
                        "n_experiences": 10 if n_classes >= 10 else 2},
           "model": model, "strategy": {"name": "naive"}, "seeds": [0],
           "train": {"epochs": 1, "batch_size": 128, "lr": LR, "device": "cuda" if device.type == "cuda" else "cpu"}}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ddp.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        for n in sorted({1, nproc}):
            out = Path(tmp) / f"n{n}"
            cmd = [sys.executable, "-m", "cltoolbox.cli", "run", str(path), "--out", str(out), "-q",
                   *(["--nproc", str(n)] if n > 1 else [])]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=os.environ.copy())
            wall = time.perf_counter() - t0
            m = json.loads(next(out.glob("*/*/*/seed_0/metrics.json")).read_text())
            times[n] = m["cost"]["train_s"]
            print(f"  ddp nproc={n}: train {m['cost']['train_s']:.2f} s, command {wall:.1f} s wall, "
                  f"ACC {m['class_il']['acc']:.3f}", flush=True)
            ROWS.append((f"ddp nproc={n} resnet18 naive b128", f"train {m['cost']['train_s']:.2f} s, "
                         f"ACC {m['class_il']['acc']:.3f}"))
    if nproc > 1:
        ratio(f"ddp train_s 1 process / {nproc} processes", times[1], times[nproc])
    else:
        print("  ddp: one visible GPU, nothing to compare", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="seconds-long sizes (the test suite's CPU run)")
    ap.add_argument("--root", help="a folder with cifar-100-python/ (real CIFAR-100); else generated images")
    ap.add_argument("--train-size", type=int, default=20000, help="generated CIFAR-100-shaped training images")
    ap.add_argument("--vit-train-size", type=int, default=2000, help="generated 224 px images for the ViT section")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--sections", nargs="+", default=["resnet", "vit", "ddp"], choices=["resnet", "vit", "ddp"])
    ap.add_argument("--no-avalanche", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; use --device cpu (with --tiny for a quick check)", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from cltoolbox.session import warm_up

    warm_up()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_bench on {name} ({device}), torch {torch.__version__}, "
          f"{torch.cuda.device_count() if device.type == 'cuda' else 0} visible GPU(s)", flush=True)
    if args.tiny:
        os.environ[SHAPE_ENV] = "120,40,4,32"
        args.batches = [32]
        args.root = None
    else:
        os.environ[SHAPE_ENV] = f"{args.train_size},{max(1000, args.train_size // 5)},100,32"
    data = gpu_bench_images(args.root)
    n_classes = data.n_classes
    print(f"data: {'CIFAR-100 from ' + args.root if args.root else 'generated uint8 images'}, "
          f"{len(data.train.labels)} train / {len(data.test.labels)} test, {n_classes} classes", flush=True)
    started = time.perf_counter()
    sections: dict[str, Callable[[], None]] = {
        "resnet": lambda: section_resnet(args, device, data, n_classes),
        "vit": lambda: section_vit(args, device),
        "ddp": lambda: section_ddp(args, device, n_classes),
    }
    for s in args.sections:
        print(f"[{s}]", flush=True)
        sections[s]()
    print(f"total {time.perf_counter() - started:.1f} s", flush=True)
    print(f"\n| gpu_bench on {name} | |\n|---|---|")  # the same numbers as a table for the README
    print("\n".join(f"| {what} | {value} |" for what, value in ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
