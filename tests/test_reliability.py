"""Issue 14's defects, one test each: concurrent runs never clear a finished run, exact resume before the first
checkpoint, sweep workers die with their parent, strategy crashes are recorded in the run folder, no temporary
files or empty folders are left behind. The concurrency and orphan-worker tests use real processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cltoolbox.cli import main

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "name": "rel",
    "scenario": {"name": "class_incremental", "dataset": "digits", "n_experiences": 2},
    "model": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "naive"},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
    "seeds": [0],
}
RUN = Path("rel/naive/class_incremental-digits")
COMPARED = ("accuracy.csv", "per_class.csv", "matrices/accuracy_class_il.csv", "matrices/accuracy_task_il.csv")


def write(tmp: Path, cfg: dict, name: str = "cfg.yaml") -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cli(*argv: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cltoolbox.cli", *argv], cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def with_threads(n: int, *argv: str) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return main(list(argv))
    finally:
        torch.set_num_threads(before)


# -- 1. a run finished by another process meanwhile is never cleared ------------------------------------------


def test_concurrent_resume_never_clears_a_run_finished_meanwhile(tmp_path: Path) -> None:
    """B plans seeds 0 and 1 (seed 1's folder does not exist yet), then is stopped; A runs seed 1 to the end;
    B continues: it must find seed 1 finished under the lock and skip it, not clear it and run it again."""
    cfg, out = write(tmp_path, CFG), tmp_path / "out"
    b = cli("run", cfg, "--out", str(out), "--seeds", "0", "1", "--resume", "-q", cwd=tmp_path)
    try:
        wait_for(lambda: (out / RUN / "seed_0").exists() or b.poll() is not None)  # B has planned both runs
        b.send_signal(signal.SIGSTOP)
        a = cli("run", cfg, "--out", str(out), "--seeds", "1", "-q", cwd=tmp_path)
        assert a.wait(timeout=120) == 0, a.stderr.read()
        a.stderr.close()
        finished = files(out / RUN / "seed_1")
        assert "DONE" in finished
    finally:
        b.send_signal(signal.SIGCONT)
    assert b.wait(timeout=120) == 0, b.stderr.read()
    b.stderr.close()
    assert files(out / RUN / "seed_1") == finished  # same bytes, same mtimes: A's finished run is untouched
    assert (out / RUN / "seed_0" / "DONE").exists()


# -- 2. resume before the first checkpoint keeps the recorded thread count ---------------------------------


def _killed_in_first_experience(src: Path, dst: Path) -> None:
    """A finished run folder, reduced to what a run killed during its first experience leaves behind."""
    shutil.copytree(src, dst)
    for p in sorted(dst.rglob("*"), reverse=True):
        if p.name not in ("config.yaml", "stream.json", "env.json"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    env_json = json.loads((dst / "env.json").read_text())
    for k in ("end_time", "status"):
        env_json.pop(k)
    (dst / "env.json").write_text(json.dumps(env_json))
    (dst / ".accuracy.csv.tmp4242").write_text("half a fi")  # a write the kill interrupted


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.slow
def test_resume_before_first_checkpoint_uses_the_recorded_threads(command: str, tmp_path: Path) -> None:
    cfg = write(tmp_path, CFG)
    assert with_threads(1, "run", cfg, "--out", str(tmp_path / "twin"), "-q", "--threads", "2") == 0
    twin = tmp_path / "twin" / RUN / "seed_0"
    assert json.loads((twin / "env.json").read_text())["torch_threads"] == 2
    killed = tmp_path / "killed" / RUN / "seed_0"
    _killed_in_first_experience(twin, killed)
    extra = ["--workers", "1", "--threads", "1"] if command == "sweep" else []
    assert with_threads(1, command, cfg, "--out", str(tmp_path / "killed"), "--resume", "-q", *extra) == 0
    assert json.loads((killed / "env.json").read_text())["torch_threads"] == 2
    for name in COMPARED:
        assert (killed / name).read_bytes() == (twin / name).read_bytes(), name
    assert not temporaries(tmp_path / "killed")


# -- 3. sweep workers exit when the sweep's parent is killed ---------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sweep_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    cfg = write(tmp_path, {**CFG, "train": {**CFG["train"], "epochs": 30}, "seeds": [0, 1, 2, 3, 4, 5]})
    out = tmp_path / "out"
    sweep = cli("sweep", cfg, "--out", str(out), "--workers", "2", "--threads", "1", "-q", cwd=tmp_path,
                start_new_session=True)
    try:
        wait_for(lambda: any(out.rglob("config.yaml")) or sweep.poll() is not None)
        assert sweep.poll() is None
        workers = _children(sweep.pid)
        assert len(workers) >= 2
        sweep.send_signal(signal.SIGKILL)  # the parent only, as `kill -9 <pid>` does
        sweep.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "sweep workers outlived their parent"
    finally:
        try:
            os.killpg(sweep.pid, signal.SIGKILL)  # this test's own process group, if anything is left
        except ProcessLookupError:
            pass
        sweep.stderr.close()
    done = len(list(out.rglob("DONE")))
    assert done < 6  # they stopped, rather than finishing what was queued to them


# -- 5. a crash inside a strategy: recorded in its run folder, the other runs go on ---------------------------

CRASH = '''
import os

from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy


class Crash(Plugin):
    def before_experience(self, learner, exp):
        if exp.index == 1 and os.environ.get("CLTOOLBOX_CRASH_TEST") == "1":
            raise RuntimeError("plugin bug")


@register_strategy("crash_test")
def crash_test() -> Crash:
    """Crashes at experience 1."""
    return Crash()
'''


@pytest.fixture
def crash_plugin(tmp_path: Path):
    from cltoolbox.registry import STRATEGIES

    path = tmp_path / "crash.py"
    path.write_text(CRASH)
    yield str(path)
    STRATEGIES._entries.pop("crash_test", None)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_strategy_crash_is_recorded_and_the_others_go_on(command: str, tmp_path: Path, crash_plugin: str,
                                                         capsys, monkeypatch) -> None:
    monkeypatch.setenv("CLTOOLBOX_CRASH_TEST", "1")
    cfg = write(tmp_path, {**CFG, "imports": [crash_plugin], "strategy": ["crash_test", "naive"], "seeds": [0, 1],
                           "train": {**CFG["train"], "epochs": 1}})
    extra = ["--workers", "1"] if command == "sweep" else []
    rc = with_threads(1, command, cfg, "--out", str(tmp_path / "out"), "-q", *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "2 of 4" in err
    for seed in (0, 1):
        crashed = tmp_path / "out" / "rel" / "crash_test" / "class_incremental-digits" / f"seed_{seed}"
        summary = json.loads((crashed / "metrics.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == "RuntimeError: plugin bug"
        log = (crashed / "error.log").read_text()
        assert "Traceback" in log and "before_experience" in log and "plugin bug" in log
        assert not (crashed / "DONE").exists()
        assert (tmp_path / "out" / RUN / f"seed_{seed}" / "DONE").exists()  # naive went on
    monkeypatch.setenv("CLTOOLBOX_CRASH_TEST", "0")  # the bug fixed: --resume continues from the checkpoint
    assert with_threads(1, command, cfg, "--out", str(tmp_path / "out"), "-q", "--resume", *extra) == 0
    for seed in (0, 1):
        resumed = tmp_path / "out" / "rel" / "crash_test" / "class_incremental-digits" / f"seed_{seed}"
        assert json.loads((resumed / "metrics.json").read_text())["status"] == "done"
        assert (resumed / "DONE").exists() and not (resumed / "error.log").exists()
        assert json.loads((resumed / "env.json").read_text())["resumed_at_experience"] == 1


# -- 6. nothing left behind: a full disk, stale temporaries, a run that fails before writing ------------------


def test_full_disk_mid_run_then_resume_is_exact_and_leaves_no_temporaries(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    from cltoolbox import results

    cfg = write(tmp_path, CFG)
    assert with_threads(1, "run", cfg, "--out", str(tmp_path / "twin"), "-q") == 0
    real_open = open

    def full_at_checkpoint(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        if "state.pt" in str(path):
            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f

    monkeypatch.setattr(results, "open", full_at_checkpoint, raising=False)
    rc = with_threads(1, "run", cfg, "--out", str(tmp_path / "out"), "-q")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "--resume" in err
    run = tmp_path / "out" / RUN / "seed_0"
    assert (run / "config.yaml").exists() and not (run / "DONE").exists()
    assert not temporaries(tmp_path / "out")
    monkeypatch.undo()  # space freed
    assert with_threads(1, "run", cfg, "--out", str(tmp_path / "out"), "-q", "--resume") == 0
    assert not temporaries(tmp_path / "out")
    for name in COMPARED:
        assert (run / name).read_bytes() == (tmp_path / "twin" / RUN / "seed_0" / name).read_bytes(), name


def test_resume_removes_temporaries_a_kill_left(tmp_path: Path) -> None:
    cfg = write(tmp_path, CFG)
    assert with_threads(1, "run", cfg, "--out", str(tmp_path / "out"), "-q") == 0
    run = tmp_path / "out" / RUN / "seed_0"
    (run / "DONE").unlink()  # killed after its last checkpoint, while writing its results
    (run / "checkpoint" / ".state.pt.tmp31337").write_bytes(b"PK")
    (run / ".metrics.json.tmp31337").write_text("{")
    (run / "matrices" / ".accuracy_class_il.csv.tmp31337").write_text("x")
    assert with_threads(1, "run", cfg, "--out", str(tmp_path / "out"), "-q", "--resume") == 0
    assert (run / "DONE").exists() and not temporaries(tmp_path / "out")


def test_a_run_failing_before_it_writes_leaves_no_empty_folders(tmp_path: Path, monkeypatch, capsys) -> None:
    from cltoolbox import session
    from cltoolbox.errors import ConfigError

    def refuse(*args, **kw):
        raise ConfigError("model: refused at build time")

    monkeypatch.setattr(session, "Learner", refuse)
    (tmp_path / "out").mkdir()
    rc = main(["run", write(tmp_path, CFG), "--out", str(tmp_path / "out"), "-q"])
    assert rc == 2 and "refused at build time" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # no empty rel/naive/.../seed_0 chain, --out itself kept


# -- 5. the README's bare-name strategy list works in sweeps and tuning ----------------------------------------


def test_bare_name_strategy_list_in_sweep_and_tune(tmp_path: Path, capsys) -> None:
    from cltoolbox.sweep import expand, prepare
    from cltoolbox.tuning import _parse

    cfg = {**CFG, "strategy": ["naive", "er"], "grid": {"train.lr": [0.01, 0.1]}}
    rc = main(["sweep", write(tmp_path, cfg), "--out", str(tmp_path / "out"), "--dry-run"])
    assert rc == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 4
    tuning, evaluation, _ = _parse(prepare({**cfg, "evaluation": {"scenario": {"class_order": "seeded"}}},
                                           out=str(tmp_path)))
    assert [p.label for p in expand(evaluation)] == ["naive-lr0.01", "naive-lr0.1", "er-lr0.01", "er-lr0.1"]
    assert len(expand(tuning)) == 4


def test_strategy_crash_in_transfer_is_recorded_and_the_others_go_on(tmp_path: Path, crash_plugin: str, capsys,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("CLTOOLBOX_CRASH_TEST", "1")
    cfg = write(tmp_path, {**CFG, "imports": [crash_plugin], "strategy": ["crash_test", "naive"],
                           "train": {**CFG["train"], "epochs": 1}})
    rc = with_threads(1, "transfer", cfg, "--out", str(tmp_path / "out"), "-q")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "1 of 2 transfer run(s) failed" in err
    crashed = tmp_path / "out" / "rel" / "transfer" / "crash_test" / "class_incremental-digits" / "seed_0"
    summary = json.loads((crashed / "metrics.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: plugin bug"
    assert "plugin bug" in (crashed / "error.log").read_text() and not (crashed / "DONE").exists()
    assert (tmp_path / "out" / "rel" / "transfer" / "naive" / "class_incremental-digits" / "seed_0" / "DONE").exists()
