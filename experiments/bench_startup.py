"""Startup cost of the ``cltoolbox`` command, measured in fresh subprocesses.

(a) ``cltoolbox --help``: wall time (target < 1 s); it must not import torch, checked with
    ``PYTHONPROFILEIMPORTTIME=1`` (the same report as ``python -X importtime``) on the real console script.
(b) ``python -c "import torch, torchvision"``: wall time and peak RSS, once with a normal exit and once
    ending in ``os._exit(0)`` (no interpreter teardown, like (c)); (c) is compared with the latter.
(c) ``cltoolbox run`` (Split-MNIST-5k, mlp 2x400, naive, one seed) up to its first training batch. A small
    driver script imports ``cltoolbox.cli``, wraps ``Learner.train_data`` to record when it is entered and
    ``Learner.forward`` (called on every training batch, after the optimizer exists) to record the first
    batch and end the process there with ``os._exit(0)``, then calls ``cli.main(["run", ...])``. It also
    writes which heavy modules (pandas, matplotlib, avalanche, torchvision, ...) were imported by then.
(d) ``import torch, torchvision`` + one ``torch.optim.SGD``: in torch 2.x the first Optimizer imports
    ``torch._dynamo`` (seconds), a cost every PyTorch training script pays before its first step.

Wall time is measured by the parent around ``posix_spawn`` .. ``wait4``; peak RSS is the child's
``ru_maxrss`` from ``wait4``. Each command runs ``--repeats`` times (interleaved rounds, after one
untimed warm-up round) and medians are reported. Run: ``python experiments/bench_startup.py``
(~1-3 min on 2 cores; each run imports torch several times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torchvision", "pandas", "matplotlib", "avalanche", "sklearn", "scipy", "mlxtend", "tqdm", "yaml",
         "torch._dynamo", "sympy")

DRIVER = r"""
import json, os, sys, time
from cltoolbox import cli
from cltoolbox.loop import Learner

REPORT = os.environ["BENCH_STARTUP_REPORT"]
marks = {}
train_data, forward = Learner.train_data, Learner.forward

def timed_train_data(self, *args, **kwargs):
    marks.setdefault("train_data", time.time())
    return train_data(self, *args, **kwargs)

def first_batch(self, x, t):
    marks["first_batch"] = time.time()
    heavy = [m for m in json.loads(os.environ["BENCH_STARTUP_HEAVY"]) if m in sys.modules]
    with open(REPORT, "w") as f:
        json.dump({**marks, "heavy": heavy, "n_modules": len(sys.modules)}, f)
    os._exit(0)

Learner.train_data = timed_train_data
Learner.forward = first_batch
sys.exit(cli.main(sys.argv[1:]))
"""

CONFIG = """\
name: bench_startup
scenario: {name: class_incremental, dataset: mnist5k, n_experiences: 5}
model: {name: mlp, hidden: [400, 400]}
strategy: {name: naive}
train: {epochs: 1, batch_size: 10, lr: 0.1}
seeds: [0]
"""


def spawn(argv: list[str], env: dict[str, str] | None = None, stderr: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises if it fails."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, stderr or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env if env is not None else dict(os.environ), file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 1024.0  # KiB on Linux


def import_report(path: str) -> list[tuple[int, str]]:
    """(self microseconds, module) of every import in a PYTHONPROFILEIMPORTTIME report."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("import time:") and "|" in line:
            own, _, name = line.split("|")
            own = own.removeprefix("import time:").strip()
            if own.isdigit():
                rows.append((int(own), name.strip()))
    return rows


def by_package(rows: list[tuple[int, str]]) -> list[tuple[float, str]]:
    """Import seconds per top-level package (self times summed), slowest first."""
    total: dict[str, int] = {}
    for own, name in rows:
        root = name.split(".")[0]
        total[root] = total.get(root, 0) + own
    return sorted(((v / 1e6, k) for k, v in total.items()), reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    py = sys.executable
    cli = shutil.which("cltoolbox", path=str(Path(py).parent)) or shutil.which("cltoolbox")
    if cli is None:
        sys.exit("the cltoolbox console script is not installed (pip install -e .)")

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        cfg = Path(tmp, "startup.yaml")
        cfg.write_text(CONFIG)
        driver = Path(tmp, "driver.py")
        driver.write_text(DRIVER)
        report = Path(tmp, "report.json")
        env = {**os.environ, "BENCH_STARTUP_REPORT": str(report), "BENCH_STARTUP_HEAVY": json.dumps(HEAVY)}
        commands = {
            "help": [cli, "--help"],
            "torch": [py, "-c", "import torch, torchvision"],
            "torch_exit": [py, "-c", "import os, torch, torchvision; os._exit(0)"],
            "torch_optim": [py, "-c", "import os, torch, torchvision; "
                            "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); os._exit(0)"],
            "run": [py, str(driver), "run", str(cfg), "--out", str(Path(tmp, "runs")), "--overwrite", "-q"],
        }
        wall: dict[str, list[float]] = {k: [] for k in commands}
        rss: dict[str, list[float]] = {k: [] for k in commands}
        marks: list[dict] = []
        for r in range(args.repeats + 1):  # round 0 warms the page cache and the dataset cache
            for name, argv in commands.items():
                w, m = spawn(argv, env)
                if name == "run":
                    if not report.exists():
                        raise RuntimeError("the run ended without reaching a training batch")
                    rep = json.loads(report.read_text())
                    report.unlink()
                    rep["spawn_to_first_batch"] = w
                if r:
                    wall[name].append(w)
                    rss[name].append(m)
                    if name == "run":
                        marks.append(rep)

        # import checks (one extra run each, not timed)
        help_imports = import_report_of([cli, "--help"], env, tmp)
        run_imports = import_report_of(commands["run"], env, tmp)
        report.unlink(missing_ok=True)

    med = {k: statistics.median(v) for k, v in wall.items()}
    mrss = {k: statistics.median(v) for k, v in rss.items()}
    help_mods = {name for _, name in help_imports}
    print(f"(a) cltoolbox --help: {med['help']:.3f} s (target < 1 s), peak RSS {mrss['help']:.0f} MB, "
          f"{len(help_mods)} modules imported; torch imported: {'torch' in help_mods}")
    print(f"(b) import torch, torchvision: {med['torch']:.3f} s, peak RSS {mrss['torch']:.0f} MB "
          f"(ending in os._exit: {med['torch_exit']:.3f} s, {mrss['torch_exit']:.0f} MB)")
    first = statistics.median(m["first_batch"] - m["train_data"] for m in marks)
    print(f"(c) cltoolbox run to first training batch: {med['run']:.3f} s, peak RSS {mrss['run']:.0f} MB "
          f"(of which train_data entry -> first batch: {first:.3f} s, the optimizer)")
    print(f"(d) import torch, torchvision + first torch.optim.SGD: {med['torch_optim']:.3f} s, "
          f"peak RSS {mrss['torch_optim']:.0f} MB")
    heavy = ", ".join(marks[-1]["heavy"]) or "none"
    print(f"    loaded at the first batch of (c): {heavy} (of {', '.join(HEAVY)}); "
          f"{marks[-1]['n_modules']} modules in all")
    print("    import time of (c) by package: "
          + ", ".join(f"{n} {sec:.2f}s" for sec, n in by_package(run_imports)[:8]))
    print(f"startup overhead: {med['run'] - med['torch_exit']:+.2f} s, {mrss['run'] - mrss['torch_exit']:+.0f} MB "
          f"peak RSS over import torch, torchvision (targets: <= 0.5 s, <= 150 MB)")
    print(f"startup overhead: {med['run'] - med['torch_optim']:+.2f} s, "
          f"{mrss['run'] - mrss['torch_optim']:+.0f} MB peak RSS over import torch, torchvision + first "
          "optimizer (what cltoolbox itself adds)")


def import_report_of(argv: list[str], env: dict[str, str], tmp: str) -> list[tuple[int, str]]:
    path = str(Path(tmp, "importtime.txt"))
    spawn(argv, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, stderr=path)
    return import_report(path)


if __name__ == "__main__":
    main()
