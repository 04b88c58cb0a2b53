# PYTHON_ARGCOMPLETE_OK
"""The ``cltoolbox`` command. Imports stay inside the commands so that ``--help`` never loads torch.

Shell completion (argcomplete): ``eval "$(register-python-argcomplete cltoolbox)"`` in bash/zsh."""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cltoolbox",
        description="Continual-learning experiments: run YAML configs into run folders with exact metrics.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action="version", version=f"cltoolbox {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    # --debug is also accepted after the command; SUPPRESS keeps the subparser from resetting it to False
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    r = sub.add_parser("run", parents=[debug], help="run an experiment YAML (every strategy x seed)")
    r.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    r.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    r.add_argument("--out", help="root folder for run folders (default: the config's `out`, else runs/)")
    r.add_argument("--seeds", type=int, nargs="+", help="seeds to run (replaces the config's `seeds`)")
    r.add_argument("--resume", action="store_true", help="continue unfinished runs, skip finished ones")
    r.add_argument("--overwrite", action="store_true", help="replace existing runs")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary table")
    _loggers_option(r)
    r.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS if set, else 1, "
                                                  "which a busy machine does not slow down; a resumed run keeps the "
                                                  "threads it started with)")
    r.add_argument("--nproc", type=int, default=1,
                   help="train each run in N processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA: "
                        "one GPU per process); train.batch_size stays the global batch. Under torchrun, omit it")

    sw = sub.add_parser("sweep", parents=[debug],
                        help="run a sweep YAML (strategies x grid points x seeds) in parallel, locally or on Ray")
    sw.add_argument("config", help="sweep YAML: an experiment config plus `grid: {train.lr: [0.01, 0.1], ...}`")
    sw.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override values of the base config")
    _sweep_options(sw)
    sw.add_argument("--seeds", type=int, nargs="+", help="seeds to run (replaces the config's `seeds`)")
    sw.add_argument("--dry-run", action="store_true", help="validate everything and list the runs; run nothing")
    sw.add_argument("--gpus-per-run", type=float, default=0.0,
                    help="with --backend ray: GPUs Ray reserves for each run (e.g. 1, or 0.5 for two runs per GPU); "
                         "each run then sees its own GPU as cuda:0")

    tu = sub.add_parser("tune", parents=[debug],
                        help="two-phase tuning: pick hyperparameters on one scenario, evaluate them on another")
    tu.add_argument("config", help="tuning YAML: a sweep YAML plus `evaluation: {scenario: {...}}`")
    tu.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override values of the base config")
    _sweep_options(tu)
    tu.add_argument("--seeds", type=int, nargs="+",
                    help="seeds of both phases (replaces `seeds` and `evaluation.seeds`)")
    tu.add_argument("--dry-run", action="store_true", help="validate both phases and list their runs; run nothing")
    tu.add_argument("--gpus-per-run", type=float, default=0.0,
                    help="with --backend ray: GPUs Ray reserves for each run (as for sweep)")

    ls = sub.add_parser("list", parents=[debug], help="list registered strategies, scenarios, datasets or models")
    ls.add_argument("kind", choices=["strategies", "scenarios", "datasets", "models"])
    ls.add_argument("--imports", nargs="+", default=[], metavar="FILE_OR_MODULE",
                    help="plugin .py files or modules to load first, or an experiment YAML whose `imports:` to load")
    ls.add_argument("--json", action="store_true", help="print JSON: name, description and typed parameters")

    ck = sub.add_parser("check", parents=[debug],
                        help="conformance checks (cltoolbox.testing) of every plugin a file or module registers")
    ck.add_argument("plugins", metavar="FILE_OR_MODULE", help="a plugin .py file or an importable module or package")

    rp = sub.add_parser("report", parents=[debug],
                        help="figures (PNG+PDF), tables (CSV/Markdown/LaTeX) and, with --html, one HTML page from runs")
    rp.add_argument("runs", nargs="+", help="run folders, or folders above them (every run with DONE is used)")
    rp.add_argument("--out", help="folder for the figures and tables (default: <first RUNS folder>/report)")
    rp.add_argument("--html", action="store_true",
                    help="also write report.html: one self-contained page (figures, sortable tables, each run's "
                         "config and environment, links to the run folders)")

    tr = sub.add_parser("transfer", parents=[debug],
                        help="pairwise task-transfer matrix T[i, j] of a config's tasks (CSV + heatmaps)")
    tr.add_argument("config", help="experiment YAML; its scenario's tasks are compared pairwise")
    tr.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    tr.add_argument("--out", help="root folder (default: the config's `out`); results in <out>/<name>/transfer/")
    tr.add_argument("--seeds", type=int, nargs="+", help="seeds (replaces the config's `seeds`)")
    tr.add_argument("--overwrite", action="store_true", help="replace existing transfer folders")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no table")
    return p


def _loggers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loggers", nargs="+", metavar="TRACKER",
                   help="experiment trackers (replaces the config's `loggers:`): tensorboard, wandb (offline unless "
                        "WANDB_MODE says otherwise), mlflow (a local store in <out>/mlruns); `none` turns them off")


def _sweep_options(p: argparse.ArgumentParser) -> None:
    _loggers_option(p)
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray (joins RAY_ADDRESS / a running cluster, "
                        "else starts a local instance)")
    p.add_argument("--workers", type=int, help="parallel runs (default: the number of cores)")
    p.add_argument("--threads", type=int,
                   help="torch threads per run (default: OMP_NUM_THREADS if set, else 1)")
    p.add_argument("--out", help="root folder for run folders (default: the config's `out`, else runs/)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue unfinished ones")
    p.add_argument("--overwrite", action="store_true", help="replace existing runs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines and no summary table")


def _version() -> str:
    from cltoolbox import __version__

    return __version__


def _list(kind: str, imports: list[str], as_json: bool) -> None:
    from pathlib import Path

    from cltoolbox.config import load_yaml
    from cltoolbox.params import type_name
    from cltoolbox.registry import REGISTRIES, import_plugins

    for spec in imports:  # a config's `imports:` are relative to its folder
        if spec.endswith((".yaml", ".yml")):
            import_plugins(load_yaml(spec).get("imports") or [], str(Path(spec).parent))
        else:
            import_plugins([spec])
    entries = REGISTRIES[kind].entries()
    if as_json:
        import json

        print(json.dumps([{"name": e.name, "description": e.description,
                           "params": [{"name": p.name, "type": type_name(p.annotation), "required": p.required,
                                       "limits": [lim.describe() for lim in p.limits],
                                       **({} if p.required else {"default": p.default})}
                                      for p in e.params.values()]}
                          for e in entries], indent=1, default=repr))
        return
    for entry in entries:
        print(f"{entry.name:<20} {entry.description}")
        for param in entry.params.values():
            print(f"{'':<22}{param.describe()}")


def _check(spec: str, debug: bool = False) -> int:
    """One line per strategy and scenario that ``spec`` registers: ok, or its failure. 2 if any failed."""
    from cltoolbox.errors import CLToolboxError
    from cltoolbox.registry import registered_by
    from cltoolbox.testing import check_scenario, check_strategy

    found = registered_by(spec)
    if not found["strategies"] and not found["scenarios"]:
        raise CLToolboxError(f"check: {spec} registers no strategy or scenario; decorate a factory with "
                             f"@register_strategy(...) or @register_scenario(...)")
    failed = 0
    for kind, checker in (("strategy", check_strategy), ("scenario", check_scenario)):
        for name in found["strategies" if kind == "strategy" else "scenarios"]:
            try:
                checker(name, imports=[spec])
            except AssertionError as e:
                if debug:
                    raise
                failed += 1
                print(f"FAIL {' '.join(str(e).split())}", flush=True)
                continue
            print(f"ok   {kind} '{name}'", flush=True)
    return EXIT_USER_ERROR if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:  # shell completion: answers the shell's _ARGCOMPLETE request and exits; nothing otherwise
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`run cfg.yaml --seeds 0 train.lr=0.05`); argparse leaves those over.
    # A malformed one (`train.lr` without =) goes on too, so that it gets the one-line override error.
    bad = [e for e in extra if args.command not in ("run", "sweep", "tune", "transfer") or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "loggers", None):  # --loggers: the config's `loggers:` replaced (names checked with it)
        names = [n for n in args.loggers if "=" not in n and n != "none"]
        moved = [n for n in args.loggers if "=" in n]  # `--loggers wandb train.lr=0.1`: overrides after it
        args.overrides = [*args.overrides, *moved, f"loggers=[{','.join(names)}]"]
    from cltoolbox.errors import CLToolboxError

    try:
        if args.command == "run":
            from cltoolbox.runner import run

            if args.threads is not None and args.threads < 1:
                raise CLToolboxError(f"--threads: must be >= 1, got {args.threads}")
            if args.nproc != 1:
                from cltoolbox import distributed

                if args.nproc < 1:
                    raise CLToolboxError(f"--nproc: must be >= 1, got {args.nproc}")
                if distributed.env_world() <= 1:  # start the N processes, each runs this command without --nproc
                    distributed.precheck(args.config, args.overrides, args.out, args.seeds)
                    return distributed.launch(args.nproc, distributed.without_nproc(sys.argv[1:] if argv is None
                                                                                    else list(argv)))
            run(args.config, overrides=args.overrides, out=args.out, seeds=args.seeds, resume=args.resume,
                overwrite=args.overwrite, quiet=args.quiet, threads=args.threads)
        elif args.command == "sweep":
            from cltoolbox.sweep import sweep

            sweep(args.config, overrides=args.overrides, out=args.out, seeds=args.seeds, backend=args.backend,
                  workers=args.workers, threads=args.threads, resume=args.resume, overwrite=args.overwrite,
                  quiet=args.quiet, dry_run=args.dry_run, debug=args.debug, gpus_per_run=args.gpus_per_run)
        elif args.command == "tune":
            from cltoolbox.tuning import tune

            result = tune(args.config, overrides=args.overrides, out=args.out, backend=args.backend,
                          workers=args.workers, threads=args.threads, resume=args.resume,
                          overwrite=args.overwrite, quiet=args.quiet, debug=args.debug, seeds=args.seeds,
                          dry_run=args.dry_run, gpus_per_run=args.gpus_per_run)
            if not args.quiet and result["report"]:
                print(f"wrote {', '.join(map(str, result['report']))}")
        elif args.command == "transfer":
            from cltoolbox.transfer import transfer

            transfer(args.config, out=args.out, overrides=args.overrides, seeds=args.seeds,
                     overwrite=args.overwrite, quiet=args.quiet)
        elif args.command == "list":
            _list(args.kind, args.imports, args.json)
        elif args.command == "check":
            return _check(args.plugins, args.debug)
        elif args.command == "report":
            from pathlib import Path

            from cltoolbox.report import report
            from cltoolbox.runfolder import check_writable

            out = args.out or str(Path(args.runs[0]) / "report")
            check_writable(out)  # an unwritable --out is one line, not a traceback
            written = report(args.runs, out)
            print(f"wrote {len(written['figures'])} figures and {len(written['tables'])} tables to {out}")
            if args.html:
                from cltoolbox.html_report import write_html

                print(f"wrote {write_html(args.runs, out, written)}")
    except CLToolboxError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `cltoolbox list ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted: finished experiences are checkpointed; rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
