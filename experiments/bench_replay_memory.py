"""Does the per-batch cost of replay depend on the memory size? Side by side: 500 vs 50,000 stored items.

What it measures, for each memory size, in ONE process with the measurements interleaved (small, large,
large, small, ... per repeat, so a busy shared machine slows both alike), the median over repeats of:

* ``er`` (reservoir ``ReplayPlugin``) and ``der`` / ``derpp`` (``DERPlugin``): the steady-state time per
  training batch of ``Learner.train_data`` (the toolbox's real epoch loop: transform_batch -> forward ->
  loss terms -> backward -> optimizer step -> after_step) on a stream batch of 10 plus a memory batch of 10,
  with the same model (the built-in ``mlp``, 2x400 by default, ``--hidden``; MNIST shape 1x28x28, 10
  classes, same initial weights) for both sizes. The samples are a pool of the largest size's number of
  synthetic images (random N(0,1), random labels) held as one in-memory stream; memories store their keys
  and replay fetches them, as in a real run. Before timing, each memory is filled directly through its own
  ``add`` (``add_with_logits`` for DER) with ``--seen-factor`` x capacity keys of the pool, so it is full and
  every later stream sample replaces a stored one with the same probability (capacity / seen) for both sizes;
* the same plugins' memory operations alone (``transform_batch`` + ``after_step`` on a fixed batch, no
  model): where a size dependence would come from;
* ``gdumb`` (``GreedyClassBalancedMemory``): the time per training batch of ``Learner.train_data`` over
  the memory's own keys (what GDumb trains on), and the sampler's cost per offered sample when one
  experience (``--gdumb-chunk`` samples) is offered to a full memory (a per-experience cost, not per batch).

Each line ends with ``ratio 50000/500: X.XXx`` (wall time, large / small; the target for ER is within 1.2x)
and the same ratio of process CPU time, which a loaded shared machine disturbs less. One torch thread
(``--threads``). Run: ``python experiments/bench_replay_memory.py`` (~1-2 min on a shared
2-core machine; ``--help`` for options, e.g. ``--sizes 500 50000 --repeats 7 --batches 200``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import cltoolbox  # noqa: F401  (imports the built-in strategies, models and datasets)
from cltoolbox.loop import Learner, TrainConfig
from cltoolbox.plugin import Batch, Plugin
from cltoolbox.registry import MODELS, STRATEGIES
from cltoolbox.stream import Experience, Stream

SHAPE = (1, 28, 28)
N_CLASSES = 10


def make_learner(plugin: Plugin, pool: Stream, args: argparse.Namespace) -> Learner:
    torch.manual_seed(args.seed)  # the same initial weights for every memory size
    model = MODELS.get("mlp").factory(SHAPE, N_CLASSES, hidden=list(args.hidden))
    # lr 0.01: random labels on random images must not diverge over thousands of steps
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.01, device="cpu")
    learner = Learner(model, [plugin], cfg, seed=args.seed)
    learner.begin(pool)  # replayed keys are fetched from the pool; memories learn its sample size
    return learner


class Clock:
    """Wall time and this process's CPU time (one thread: the CPU time is what we used, whatever the load)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, n: int) -> tuple[float, float]:
        return (time.perf_counter() - self.wall) / n, (time.process_time() - self.cpu) / n


def synthetic_pool(n: int, g: torch.Generator) -> Stream:
    """One in-memory experience of ``n`` random images with random labels: what the memories' keys point to."""
    x = torch.randn((n, *SHAPE), generator=g)
    y = torch.randint(N_CLASSES, (n,), generator=g)
    exp = Experience.from_tensors(0, 0, range(N_CLASSES), x, y, x[:1], y[:1])
    return Stream("pool", [exp], N_CLASSES, SHAPE, list(range(N_CLASSES)), "class_incremental")


def pool_samples(pool: Stream, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, y, t) of ``n`` pool samples from position ``start`` on, wrapping around the pool."""
    exp = pool[0]
    rows = torch.arange(start, start + n) % exp.n_train
    y = exp.y_train[rows]
    return pool.keys(exp.train)[rows], y, torch.zeros_like(y)


def fill(plugin: Plugin, kind: str, pool: Stream, n: int, g: torch.Generator, chunk: int = 10_000) -> None:
    """Offer ``n`` pool samples to the plugin's memory through its own add method."""
    mem = plugin.memory
    for s in range(0, n, chunk):
        key, y, t = pool_samples(pool, s, min(chunk, n - s))
        if kind == "der":
            mem.add_with_logits(key, y, t, torch.randn((y.shape[0], N_CLASSES), generator=g), g)
        else:
            mem.add(key, y, t, g)


def build(name: str, capacity: int) -> tuple[Plugin, str]:
    (plugin,) = STRATEGIES.get(name).factory(memory_size=capacity)
    return plugin, "der" if name in ("der", "derpp") else "replay"


Timing = tuple[float, float]  # (wall, cpu) seconds per unit


def interleaved(fns: dict[int, Callable[[], Timing]], repeats: int) -> dict[int, Timing]:
    """Median over repeats of each fn's (wall, cpu); order small, large / large, small alternating."""
    keys = sorted(fns)
    vals: dict[int, list[Timing]] = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys if r % 2 == 0 else keys[::-1]:
            vals[k].append(fns[k]())
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in vals.items()}


def report(label: str, unit: str, med: dict[int, Timing], scale: float) -> None:
    """One line: wall time per unit for each size, the wall ratio, and the CPU-time ratio beside it."""
    small, large = min(med), max(med)
    parts = "   ".join(f"{k:>6}: {med[k][0] * scale:8.3f} {unit}" for k in sorted(med))
    cpu = med[large][1] / med[small][1]
    print(f"{label:<36}{parts}   ratio {large}/{small}: {med[large][0] / med[small][0]:.2f}x (cpu {cpu:.2f}x)",
          flush=True)


def bench_replay(name: str, sizes: list[int], args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    pool = synthetic_pool(max(sizes), g)
    stream = pool_samples(pool, 0, args.batches * args.batch_size)
    learners, plugins = {}, {}
    for cap in sizes:
        plugin, kind = build(name, cap)
        learners[cap] = make_learner(plugin, pool, args)
        fill(plugin, kind, pool, args.seen_factor * cap, g)
        assert plugin.memory.size == cap, "the memory must be full before timing"
        plugins[cap] = plugin
    for lrn in learners.values():  # warm-up: allocator, autograd, first-call paths
        lrn.train_data(*stream, epochs=1)

    def train_fn(cap: int) -> Callable[[], Timing]:
        def f() -> Timing:
            clock = Clock()
            learners[cap].train_data(*stream, epochs=1)
            return clock.per(args.batches)
        return f

    report(f"{name} train step (bs {args.batch_size}+{args.batch_size})", "ms/batch",
           interleaved({c: train_fn(c) for c in sizes}, args.repeats), 1e3)

    # memory operations alone: the two hooks that touch the memory, on one fixed stream batch
    key, y, t = pool_samples(pool, 0, args.batch_size)
    x = pool.fetch(key)
    logits = torch.randn((args.batch_size, N_CLASSES), generator=g)

    def ops_fn(cap: int) -> Callable[[], Timing]:
        p, lrn = plugins[cap], learners[cap]

        def f() -> Timing:
            n = 200
            clock = Clock()
            for _ in range(n):
                b = Batch(x, y, t, key)
                if name == "er":
                    b = p.transform_batch(lrn, b)
                else:  # DER samples in its loss hook; the stored logits come from that batch's forward
                    p._batch, p._logits = b, logits
                    p.memory.sample_with_logits(args.batch_size, lrn.generator)
                    if p.beta > 0:
                        p.memory.sample_with_logits(args.batch_size, lrn.generator)
                p.after_step(lrn, b)
            return clock.per(n)
        return f

    report(f"{name} memory ops only", "us/batch", interleaved({c: ops_fn(c) for c in sizes}, args.repeats), 1e6)


def bench_gdumb(sizes: list[int], args: argparse.Namespace) -> None:
    from cltoolbox.strategies.gdumb import GreedyClassBalancedMemory

    g = torch.Generator().manual_seed(args.seed)
    pool = synthetic_pool(max(max(sizes), args.gdumb_chunk), g)
    mems, learners = {}, {}
    for cap in sizes:
        mem = GreedyClassBalancedMemory(cap)
        mem.add(*pool_samples(pool, 0, cap), g)
        mems[cap] = mem
        (plugin,) = STRATEGIES.get("gdumb").factory(memory_size=cap)
        learners[cap] = make_learner(plugin, pool, args)
    biggest = max(sizes)

    def train_fn(cap: int) -> Callable[[], Timing]:
        epochs = max(1, biggest // cap)  # about the same number of batches for every size
        n_batches = epochs * -(-cap // args.batch_size)

        def f() -> Timing:
            clock = Clock()
            learners[cap].train_data(*mems[cap].tensors(), epochs=epochs)
            return clock.per(n_batches)
        return f

    for cap in sizes:  # warm-up
        learners[cap].train_data(*mems[cap].tensors(), epochs=1)
    report(f"gdumb train step on memory (bs {args.batch_size})", "ms/batch",
           interleaved({c: train_fn(c) for c in sizes}, max(3, args.repeats // 2)), 1e3)

    offer = pool_samples(pool, 0, args.gdumb_chunk)

    def add_fn(cap: int) -> Callable[[], Timing]:
        def f() -> Timing:
            clock = Clock()
            mems[cap].add(*offer, g)
            return clock.per(args.gdumb_chunk)
        return f

    report(f"gdumb sampler, {args.gdumb_chunk} offered", "us/sample",
           interleaved({c: add_fn(c) for c in sizes}, args.repeats), 1e6)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[500, 50_000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--strategies", nargs="+", default=["er", "der", "derpp", "gdumb"],
                    choices=["er", "der", "derpp", "gdumb"])
    ap.add_argument("--batch-size", type=int, default=10, help="stream batch; the memory batch is the same")
    ap.add_argument("--hidden", type=int, nargs="+", default=[400, 400], help="mlp hidden sizes (same for all)")
    ap.add_argument("--batches", type=int, default=200, help="training batches per timed call")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per size (median reported)")
    ap.add_argument("--seen-factor", type=int, default=2, help="samples offered before timing, x capacity")
    ap.add_argument("--gdumb-chunk", type=int, default=4000, help="samples offered per gdumb add call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = sorted(args.sizes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), sizes {sizes}, "
          f"model mlp {'x'.join(map(str, args.hidden))}, median of {args.repeats} interleaved repeats")
    for name in args.strategies:
        if name == "gdumb":
            bench_gdumb(sizes, args)
        else:
            bench_replay(name, sizes, args)


if __name__ == "__main__":
    main()
