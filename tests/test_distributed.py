"""Multi-process training (cltoolbox.distributed) with the gloo backend on CPU, 2 processes: the same result as
one process, only rank 0 writes the run folder, a killed 2-process run resumes to the uninterrupted result,
strategies that cannot keep the rules refuse in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cltoolbox import distributed
from cltoolbox.loop import Batch

RUN = "ddp/er+ddp_crash/class_incremental-digits/seed_0"

PLUGIN = '''
import os
from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy


class Crash(Plugin):
    """Dies after experience CLTOOLBOX_TEST_CRASH_AT (unset: never), on every rank, like a killed job."""

    supports_ddp = True

    def after_experience(self, learner, exp):
        if str(exp.index) == os.environ.get("CLTOOLBOX_TEST_CRASH_AT"):
            raise SystemExit(3)


@register_strategy("ddp_crash")
def ddp_crash() -> list:
    return [Crash()]
'''

# installed in rank 1 only (sitecustomize on its PYTHONPATH): logs every path it opens for writing, renames
# onto or creates as a folder, so the test can see whether it wrote anything under --out
TRACER = '''
import builtins, io, os
_open, _os_open, _replace, _rename, _mkdir = builtins.open, os.open, os.replace, os.rename, os.mkdir
_LOG = os.environ["CLTOOLBOX_TEST_WRITE_LOG"]

def _log(path):
    with _open(_LOG, "a") as f:
        f.write(os.path.abspath(os.fsdecode(path)) + "\\n")

def open(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        _log(file)
    return _open(file, mode, *a, **k)

def os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        _log(path)
    return _os_open(path, flags, *a, **k)

def replace(src, dst, *a, **k):
    _log(dst)
    return _replace(src, dst, *a, **k)

def rename(src, dst, *a, **k):
    _log(dst)
    return _rename(src, dst, *a, **k)

def mkdir(path, *a, **k):
    _log(path)
    return _mkdir(path, *a, **k)

builtins.open = io.open = open
os.open, os.replace, os.rename, os.mkdir = os_open, replace, rename, mkdir
'''


def _config(tmp: Path) -> Path:
    (tmp / "crash_plugin.py").write_text(PLUGIN)
    cfg = tmp / "ddp.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: ddp
        imports: [crash_plugin.py]
        scenario: {name: class_incremental, dataset: digits, n_experiences: 3, first_classes: 4}
        model: {name: mlp, hidden: [32]}
        strategy: {name: er, memory_size: 50, plugins: [{name: ddp_crash}]}
        train: {epochs: 1, batch_size: 10, lr: 0.05}
        seeds: [0]
    """))
    return cfg


def _launch(nproc: int, args: list[str], tmp: Path, crash_at: int | None = None) -> list[int]:
    """``cltoolbox run`` in ``nproc`` processes (torchrun's environment); rank 1 traces its writes."""
    port = distributed.free_port()
    tracer = tmp / "tracer"
    tracer.mkdir(exist_ok=True)
    (tracer / "sitecustomize.py").write_text(TRACER)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CLTOOLBOX_TEST_WRITE_LOG": str(tmp / f"writes_rank{rank}.txt")}
        if crash_at is not None:
            env["CLTOOLBOX_TEST_CRASH_AT"] = str(crash_at)
        if rank == 1:
            env["PYTHONPATH"] = os.pathsep.join([str(tracer), env.get("PYTHONPATH", "")])
            env["TMPDIR"] = str(tmp / "rank1_tmp")
            (tmp / "rank1_tmp").mkdir(exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "cltoolbox.cli", "run", *args, "-q"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, _) in zip(procs, outs, strict=True):
        if p.returncode not in (0,) and crash_at is None:
            raise AssertionError(out[-2000:])
    return [p.returncode for p in procs]


def _acc(out: Path) -> float:
    return json.loads((out / RUN / "metrics.json").read_text())["class_il"]["acc"]


def _written_under(log: Path, folder: Path) -> list[str]:
    if not log.exists():
        return []
    root = str(folder.resolve())
    return [line for line in log.read_text().splitlines() if line.startswith(root)]


@pytest.mark.slow
def test_two_processes_write_only_rank0_and_resume(tmp_path):
    """~45 s on 2 cores: a 2-process run with rank 1's writes traced; a 2-process run killed after experience 1
    and resumed, which must end exactly like the uninterrupted one (test_strategies_under_ddp_match_one_process
    compares with one process)."""
    cfg = _config(tmp_path)
    _launch(2, [str(cfg), "--out", str(tmp_path / "two")], tmp_path)
    assert _acc(tmp_path / "two") > 0.5
    assert (tmp_path / "two" / RUN / "DONE").exists()
    assert (tmp_path / "writes_rank1.txt").exists(), "the write tracer did not run in rank 1"
    assert _written_under(tmp_path / "writes_rank1.txt", tmp_path / "two") == []
    assert not list((tmp_path / "rank1_tmp").glob("cltoolbox-rank1-*"))  # its scratch session folder is gone

    codes = _launch(2, [str(cfg), "--out", str(tmp_path / "cut")], tmp_path, crash_at=1)
    assert all(c != 0 for c in codes) and not (tmp_path / "cut" / RUN / "DONE").exists()
    assert (tmp_path / "cut" / RUN / "checkpoint" / "state.pt").exists()
    _launch(2, [str(cfg), "--out", str(tmp_path / "cut"), "--resume"], tmp_path)
    full = json.loads((tmp_path / "two" / RUN / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / RUN / "metrics.json").read_text())
    assert cut["class_il"] == full["class_il"] and cut["task_il"] == full["task_il"]
    assert _written_under(tmp_path / "writes_rank1.txt", tmp_path / "cut") == []


@pytest.mark.slow
def test_strategies_under_ddp_match_one_process():
    """~25 s: replay memories, Fisher/importance, GEM/A-GEM reference gradients and L2P's prompt selection counts
    end the same on both ranks (plugin state checksums equal) and as in one process (accuracies within 0.02,
    weights up to float rounding: DDP averages the shards' gradients in another summation order)."""
    names = ["er", "ewc", "si", "mas", "lwf", "agem", "gem", "l2p", "dualprompt", "gdumb", "icarl", "simplecil",
             "der", "derpp", "er_ace", "ranpac", 'ranpac@{"adapt": "body"}',
             'ranpac@{"adapt": "film", "model": {"name": "resnet18_reduced"}}', "lucir",
             'lucir@{"balanced_epochs": 1}', 'podnet@{"memory_size": 50, "proxies": 2, "balanced_epochs": 1}',
             "slca", 'wa@{"memory_size": 60}', 'bic@{"memory_size": 60}',
             'lwf@{"train": {"batch_size": 7}}']  # every shard pair uneven (4 + 3): extra terms weighted too
    script = str(Path(__file__).with_name("ddp_equivalence.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, script, *names], capture_output=True, text=True, env=env, check=True)
    port = distributed.free_port()
    procs = [subprocess.Popen([sys.executable, script, *names], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    ref = {r["strategy"]: r for r in map(json.loads, one.stdout.splitlines())}
    ranks = [{r["strategy"]: r for r in map(json.loads, out.splitlines())} for out, _ in outs]
    for name in names:
        a, b = ranks[0][name], ranks[1][name]
        assert a["acc"] == b["acc"] and a["weights"] == b["weights"] and a["plugins"] == b["plugins"], name
        assert max(abs(x - y) for x, y in zip(a["acc"], ref[name]["acc"], strict=True)) <= 0.02, name
        assert a["weights"] == pytest.approx(ref[name]["weights"], rel=1e-4, abs=1e-3), name
        assert a["plugins"] == pytest.approx(ref[name]["plugins"], rel=1e-4, abs=1e-3), name


def test_shards_cover_the_global_batch():
    for n in (1, 7, 10, 33):
        for world in (2, 3, 4):
            spans = [distributed.Dist(r, world, r).shard_rows(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_strategies_without_ddp_support_refuse_in_one_line(tmp_path, monkeypatch):
    from cltoolbox.errors import ConfigError
    from cltoolbox.registry import STRATEGIES

    for name in ("xder", "rer"):  # rer subclasses er's plugin: the declaration is not inherited
        entry = {"name": name, "label": name, "plugins": [],
                 **{k: p.default for k, p in STRATEGIES.get(name).params.items()}}
        with pytest.raises(ConfigError) as e:
            distributed.check_strategy(entry)
        assert "does not support multi-process training" in str(e.value) and "\n" not in str(e.value)
    distributed.check_strategy({"name": "er", "label": "er", "plugins": [],
                                **{k: p.default for k, p in STRATEGIES.get("er").params.items()}})


def test_nproc_argument_is_removed_for_the_started_processes():
    assert distributed.without_nproc(["run", "a.yaml", "--nproc", "2", "-q"]) == ["run", "a.yaml", "-q"]
    assert distributed.without_nproc(["run", "a.yaml", "--nproc=4"]) == ["run", "a.yaml"]


def test_shard_weights_the_criterion_by_the_rank_share():
    """A rank's criterion weight is rows x world / n, so the mean over ranks of the weighted shard means is the
    global batch's mean loss even when the shards differ in size."""
    from cltoolbox.loop import Learner, TrainConfig

    losses = torch.arange(7, dtype=torch.float64)
    batch = Batch(torch.zeros(7, 2), torch.zeros(7, dtype=torch.long), torch.zeros(7, dtype=torch.long))
    learner = Learner(torch.nn.Linear(2, 2), [], TrainConfig(device="cpu"))
    total = 0.0
    for r in range(2):
        shard, share = learner._shard(batch, distributed.Dist(r, 2, r))
        lo, hi = distributed.Dist(r, 2, r).shard_rows(7)
        assert len(shard) == hi - lo
        total += float(losses[lo:hi].mean()) * share
    assert total / 2 == pytest.approx(float(losses.mean()))


@pytest.mark.parametrize("args, words", [
    (["--backend", "ray", "--gpus-per-run", "1"], "this machine has no CUDA device; use 0"),
    (["--gpus-per-run", "1"], "needs --backend ray"),
    (["--backend", "ray", "--gpus-per-run", "-1"], "must be >= 0"),
])
def test_gpus_per_run_is_checked_in_one_line(tmp_path, capsys, monkeypatch, args, words):
    from cltoolbox.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("name: s\nscenario: {name: class_incremental, dataset: digits, n_experiences: 2}\n"
                   "model: {name: mlp, hidden: [8]}\nstrategy: {name: naive}\ngrid: {train.lr: [0.1]}\n")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus-per-run" in err[0] and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_nproc_refuses_once_before_starting_processes(tmp_path, capsys):
    from cltoolbox.cli import main

    cfg = tmp_path / "ace.yaml"
    cfg.write_text("name: ace\nscenario: {name: class_incremental, dataset: digits, n_experiences: 2}\n"
                   "model: {name: mlp, hidden: [8]}\nstrategy: {name: xder, memory_size: 20}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--nproc", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support multi-process training" in err[0]
    assert not (tmp_path / "o").exists()
