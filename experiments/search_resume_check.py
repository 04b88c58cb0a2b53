"""A 20-trial TPE search on the tuning example, killed and resumed: does it run the same trials?

Runs ``cltoolbox tune experiments/tuning_tpe_mnist5k.yaml`` (the tuning example with ``search: {method: tpe,
trials: 20}``; naive, er, lwf: 20 trials each) three ways in separate output folders: uninterrupted (the
reference), and killed (SIGKILL to the whole process group, workers included) once ``--kill-after`` trials are
recorded, then resumed with ``--resume``. Prints both trial tables side by side (learning rate and mean class-IL
ACC per trial), the selected points and their evaluation, and wall/CPU time of each phase.

    python experiments/search_resume_check.py [--seeds 0] [--workers 2] [--kill-after 25] [--kill-delay 5]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "tuning_tpe_mnist5k.yaml"


def command(out: Path, seeds: list[int], workers: int, resume: bool = False) -> list[str]:
    s = "[" + ",".join(map(str, seeds)) + "]"
    return [sys.executable, "-m", "cltoolbox.cli", "tune", str(CONFIG), "--out", str(out), "--workers", str(workers),
            "-q", f"seeds={s}", f"evaluation.seeds={s}", *(["--resume"] if resume else [])]


def trials(out: Path) -> list[dict]:
    path = out / "tuning_tpe_mnist5k" / "tuning" / "search_trials.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def timed(cmd: list[str], **kw) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=25, help="trials recorded (all strategies) before the kill")
    ap.add_argument("--kill-delay", type=float, default=0.0,
                    help="seconds to wait after --kill-after trials, so that the next round's runs are mid-way")
    ap.add_argument("--out", default="/tmp/cltoolbox_search_resume")
    ap.add_argument("--reference", help="the out folder of an earlier uninterrupted run (same --seeds): reuse it")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    ref, killed = root / "reference", root / "killed"

    if args.reference:
        ref = Path(args.reference) / "reference"
        print(f"reference: reused from {ref}")
    else:
        wall, cpu, rc = timed(command(ref, args.seeds, args.workers))
        assert rc == 0, "the reference search failed"
        print(f"reference: uninterrupted search + evaluation: {wall:.0f} s wall, {cpu:.0f} s CPU (all processes)")

    t0 = time.perf_counter()
    proc = subprocess.Popen(command(killed, args.seeds, args.workers), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    while proc.poll() is None and len(trials(killed)) < args.kill_after:
        time.sleep(0.2)
    time.sleep(args.kill_delay)
    if proc.poll() is not None:
        sys.exit("the search finished before the kill; lower --kill-after")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(trials(killed))
    unfinished = [p.parent for p in killed.rglob("checkpoint") if not (p.parent / "DONE").exists()]
    print(f"killed after {time.perf_counter() - t0:.0f} s with {before} trials recorded "
          f"({len(unfinished)} run(s) interrupted mid-run)")
    wall, cpu, rc = timed(command(killed, args.seeds, args.workers, resume=True))
    assert rc == 0, "the resumed search failed"
    print(f"resumed: {wall:.0f} s wall, {cpu:.0f} s CPU")

    a, b = trials(ref), trials(killed)
    print(f"\n{'strategy':<9}{'trial':>6}  {'lr (reference)':>16}{'lr (resumed)':>16}  {'ACC ref':>9}{'ACC res':>9}")
    for x, y in zip(a, b, strict=True):
        lr_a, lr_b = float(x["value:train.lr"]), float(y["value:train.lr"])
        print(f"{x['strategy']:<9}{x['trial']:>6}  {lr_a:>16.6f}{lr_b:>16.6f}"
              f"  {float(x['acc_mean']):>9.4f}{float(y['acc_mean']):>9.4f}")
    same = a == b
    print(f"\n{len(a)} trials; identical trial tables (values, objectives, states): {same}")
    for name, folder in (("reference", ref), ("killed", killed)):
        report = (folder / "tuning_tpe_mnist5k" / "tuning_report.md").read_text().splitlines()
        table = [ln for ln in report if ln.startswith("| ") and "Selected" not in ln][:3]
        print(f"{name}: selected and evaluated:\n  " + "\n  ".join(table))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
