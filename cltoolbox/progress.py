"""Progress on stderr for ``cltoolbox run`` and ``cltoolbox sweep``.

On a terminal: a bar per run that advances with the optimizer steps inside each epoch (loss and epoch in its
postfix), under a bar for the whole config (experiences of all its runs) whose ETA is the config's. When
stderr is not a terminal (a log file, a pipe, a batch job): plain lines, one per finished experience, each
with the run's elapsed time and the whole config's progress and ETA, and no carriage-return frames. Sweeps
print one line per finished run with the sweep's ETA (``sweep_line``).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def is_terminal(stream: IO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced
        return False


def clock(seconds: float) -> str:
    """``1:02:03`` / ``02:03``, as tqdm shows times."""
    s = max(0, int(round(seconds)))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConfigProgress:
    """Progress over every experience of every run still to train in one config (``total`` of them)."""

    def __init__(self, total: int, quiet: bool = False, file: IO | None = None) -> None:
        self.file = sys.stderr if file is None else file
        self.quiet = quiet
        self.terminal = is_terminal(self.file)
        self.total, self.done = total, 0
        self.start = time.perf_counter()
        self.bar = None
        if not quiet and self.terminal and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="all runs", unit="exp", position=0, leave=False, file=self.file,
                            dynamic_ncols=True)

    def eta(self) -> float | None:
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.done * (self.total - self.done)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def status(self) -> str:
        eta = self.eta()
        return (f"all runs: {self.done}/{self.total} experiences, {clock(time.perf_counter() - self.start)} elapsed"
                + (f", ETA {clock(eta)}" if eta is not None else ""))

    def run(self, label: str, stream: Any, batch_size: int, epochs: int, start: int = 0,
            quiet: bool = False) -> RunProgress:
        return RunProgress(self, label, stream, batch_size, epochs, start, quiet)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_CURRENT: list[ConfigProgress] = []


class session:
    """``with progress.session(total, quiet):`` around a config's runs; ``current()`` inside it."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.progress = ConfigProgress(total, quiet)

    def __enter__(self) -> ConfigProgress:
        _CURRENT.append(self.progress)
        return self.progress

    def __exit__(self, *exc: object) -> None:
        _CURRENT.remove(self.progress)
        self.progress.close()


def current(quiet: bool = False) -> ConfigProgress:
    """The config's progress, or one for a single run (``execute_run`` called on its own)."""
    return _CURRENT[-1] if _CURRENT else ConfigProgress(0, quiet)


class _StepTicker:
    """An ``after_step`` hook (added to the learner's hook list, not to its plugins: no state, no checkpoint)
    that advances the run's bar every ``every`` steps."""

    def __init__(self, bar: Any, every: int) -> None:
        self.bar, self.every, self.count = bar, every, 0

    def after_step(self, learner: Any, batch: Any) -> None:
        self.count += 1
        if self.count == self.every:
            self.bar.update(self.count)
            self.count = 0


class RunProgress:
    """One run: a step bar (terminal) or one line per experience (otherwise); silent when quiet."""

    def __init__(self, parent: ConfigProgress, label: str, stream: Any, batch_size: int, epochs: int,
                 start: int, quiet: bool = False) -> None:
        self.parent, self.label = parent, label
        self.T, self.index = len(stream), start
        self.start = time.perf_counter()
        self.quiet = quiet or parent.quiet
        self.loss: float | None = None
        # optimizer steps of the standard loop per experience (a strategy that trains otherwise, e.g. GDumb,
        # is corrected at each experience's end)
        self.steps = [epochs * -(-e.n_train // batch_size) for e in stream.experiences]
        self.bar = None
        self.ticker: _StepTicker | None = None
        if not self.quiet and parent.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.steps), initial=sum(self.steps[:start]), desc=label, unit="step",
                            position=1, leave=False, file=parent.file, dynamic_ncols=True, mininterval=0.2)
            self.ticker = _StepTicker(self.bar, max(1, sum(self.steps) // 1000))

    def attach(self, learner: Any) -> None:
        """Step updates and the epoch's loss in the bar; the loss in the plain lines."""
        if self.quiet:
            return
        if self.ticker is not None:
            learner.hooks["after_step"].append(self.ticker)

        def on_epoch_end(row: dict[str, Any]) -> None:
            self.loss = row["loss"]
            if self.bar is not None:
                self.bar.set_postfix_str(f"exp {row['experience'] + 1}/{self.T} epoch {row['epoch'] + 1}/"
                                         f"{row['epochs']} loss {row['loss']:.3f}", refresh=False)

        previous = learner.on_epoch_end

        def chained(row: dict[str, Any]) -> None:
            on_epoch_end(row)
            if previous is not None:
                previous(row)

        learner.on_epoch_end = chained

    def experience_done(self, index: int) -> None:
        self.index = index + 1
        self.parent.advance()
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = sum(self.steps[: self.index])  # exact at each experience's end
            if self.ticker is not None:
                self.ticker.count = 0
            self.bar.refresh()
            return
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        overall = f"; {self.parent.status()}" if self.parent.total else ""  # a run outside `cltoolbox run`: alone
        print(f"{self.label}: experience {self.index}/{self.T} done, {clock(time.perf_counter() - self.start)} "
              f"elapsed{loss}{overall}", file=self.parent.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sweep_line(count: int, total: int, start: float) -> str:
    """``[3/12]``-style prefix state: the sweep's elapsed time and ETA after ``count`` of ``total`` runs."""
    elapsed = time.perf_counter() - start
    eta = elapsed / count * (total - count) if count else None
    return f"sweep {clock(elapsed)} elapsed" + (f", ETA {clock(eta)}" if eta is not None and count < total else "")
