"""Default torch threads on a busy machine (issue 12): the quickstart, one seed, on a quiet machine and then with a
competing process spinning on every core, under the default thread policy and under the old one (torch's
default: one thread per core, i.e. ``--threads N`` for N cores), side by side.

    python experiments/bench_contention.py                       # naive, er, joint; seed 0
    python experiments/bench_contention.py --strategies naive    # shorter

Each configuration is a fresh ``cltoolbox run`` process (torch import and data loading included, as a user
sees it), with OMP_NUM_THREADS unset so that the default policy applies. Prints wall time, CPU time (the child
process's user+system), the runs' own wall_s summed from metrics.json, the load average before and after, and
``ratio`` lines: busy / quiet wall time per policy (the target is <= 2x). The machine may be shared: each line
also says how many cores' worth of CPU other processes (not this benchmark's) used during that measurement;
with 1 thread and one spinning process per core, a fair scheduler alone predicts (cores + 1) / cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def spin() -> None:  # a competing process: pure CPU, never sleeps
    while True:
        pass


def machine_cpu_s() -> float:
    """CPU seconds every process on this machine has used (/proc/stat, all cores); 0 where there is none."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # not idle, not iowait
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure(cfg: Path, out: Path, threads: int | None, hogs: list[int]) -> dict[str, Any]:
    """One ``cltoolbox run`` in a fresh process; wall, CPU (children's rusage), the runs' own wall_s, and the
    CPU time other processes of this shared machine used meanwhile (not the run, not the spinning hogs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "cltoolbox.cli", "run", str(cfg), "--out", str(out), "-q", "--overwrite"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    load_before = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0, h0 = machine_cpu_s(), process_cpu_s(hogs)
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    others = max(0.0, machine_cpu_s() - m0 - (process_cpu_s(hogs) - h0) - cpu)
    costs = [json.loads(p.read_text())["cost"] for p in out.rglob("metrics.json")]
    used = {json.loads(p.read_text())["torch_threads"] for p in out.rglob("env.json")}
    return {"wall_s": wall, "cpu_s": cpu, "runs_wall_s": sum(c["wall_s"] for c in costs),
            "runs_cpu_s": sum(c["cpu_s"] for c in costs), "threads": sorted(used),
            "load_before": load_before, "load_after": os.getloadavg()[0], "others_cores": others / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments" / "quickstart.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", nargs="+", help="strategy names to keep (default: all of the config's)")
    p.add_argument("--old-threads", type=int, default=cores(),
                   help="the old policy's thread count (torch's default: one per core; default %(default)s)")
    p.add_argument("--hogs", type=int, default=cores(), help="competing spinning processes (default: one per core)")
    args = p.parse_args(argv)

    cfg = yaml.safe_load(Path(args.config).read_text())
    strategies = cfg["strategy"] if isinstance(cfg["strategy"], list) else [cfg["strategy"]]
    if args.strategies:
        strategies = [s for s in strategies if s["name"] in args.strategies]
    cfg.update(strategy=strategies, seeds=[args.seed])
    policies = {"default": None, f"old (--threads {args.old_threads})": args.old_threads}
    print(f"# {cores()} cores; quickstart seed {args.seed}: {', '.join(s['name'] for s in strategies)}; "
          f"{args.hogs} spinning process(es) when busy; load average now {os.getloadavg()}", flush=True)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_contention") as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for machine in ("quiet", "busy"):
            hogs = []
            if machine == "busy":
                hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.hogs)]
                for h in hogs:
                    h.start()
                time.sleep(1.0)
            try:
                for name, threads in policies.items():
                    r = measure(path, Path(tmp) / f"{machine}-{threads}", threads, [h.pid for h in hogs])
                    results[machine, name] = r
                    print(f"{machine:<6} {name:<20} threads {r['threads']}  wall {r['wall_s']:7.1f} s  "
                          f"cpu {r['cpu_s']:7.1f} s  runs' wall_s {r['runs_wall_s']:7.1f} s  "
                          f"runs' cpu_s {r['runs_cpu_s']:7.1f} s  load {r['load_before']:.2f} -> "
                          f"{r['load_after']:.2f}  other processes used {r['others_cores']:.2f} cores",
                          flush=True)
            finally:
                for h in hogs:
                    h.terminate()
                for h in hogs:
                    h.join()
    for name in policies:
        q, b = results["quiet", name], results["busy", name]
        print(f"ratio busy/quiet wall {name}: {b['wall_s'] / q['wall_s']:.2f}x  "
              f"(runs' wall_s {b['runs_wall_s'] / q['runs_wall_s']:.2f}x, cpu {b['cpu_s'] / q['cpu_s']:.2f}x)")
    old = f"old (--threads {args.old_threads})"
    print(f"ratio busy wall old/default: {results['busy', old]['wall_s'] / results['busy', 'default']['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
