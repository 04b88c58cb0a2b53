"""One run over several processes with torch.distributed (DistributedDataParallel).

``cltoolbox run CONFIG --nproc N`` starts N copies of the command with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); under ``torchrun`` the same config runs
unchanged. The backend is NCCL when the processes train on CUDA (each on ``cuda:LOCAL_RANK``), else gloo.

What a batch means: ``train.batch_size`` is the GLOBAL batch. Every rank draws the same seeded batch (the
learner's generator is seeded alike everywhere), runs the strategy's ``transform_batch`` on all of it (so
replay memories are updated from the global batch's keys and stay identical on every rank), then trains on
its contiguous shard of the rows. DDP averages the shards' gradients; each rank's loss (criterion plus the
plugins' extra terms) is weighted by its share of the rows (rows x world / n), so that per-row means over the shard
and terms every rank computes alike (a penalty, a memory batch) both average to the global batch's, and the update
is the one-process update of the same global batch (up to float summation order). A term that is a mean over a
subset of the rows (ER-ACE's two halves, LUCIR's exemplar rows) divides by the subset's size in the global batch.
Randomness drawn per row (augmentation) is drawn for the whole global batch on every rank.

After each experience rank 0's model buffers, plugin state (memories, Fisher/importance, prompt keys,
prototypes) and generator are broadcast to all ranks, so evaluation and the checkpoint are the same
everywhere whatever a strategy computed per rank; rank 0 alone writes the run folder.

A plugin class declares that it keeps these rules with ``supports_ddp = True`` in its own body (not inherited:
see ``Plugin``); a strategy with a plugin that does not is refused with one line before training.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cltoolbox.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run."""

    rank: int
    world: int
    local_rank: int

    def shard_rows(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's rows of an n-row global batch: contiguous, sizes differ by at most 1."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


_CURRENT: list[Dist] = []


def current() -> Dist | None:
    """The multi-process context of this process, or None for an ordinary single-process run."""
    return _CURRENT[0] if _CURRENT else None


def is_rank0() -> bool:
    d = current()
    return d is None or d.rank == 0


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device_name: str = "auto") -> Dist | None:
    """Join the process group torchrun (or ``--nproc``) described in the environment; None when WORLD_SIZE is
    1 or unset. ``device_name`` (train.device) picks the backend: NCCL for CUDA, gloo for CPU."""
    if _CURRENT:
        return _CURRENT[0]
    world = env_world()
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    _CURRENT.append(Dist(rank, world, local))
    return _CURRENT[0]


def shutdown() -> None:
    if _CURRENT and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT.clear()


def rank_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) when training on CUDA."""
    d = current()
    if d is None or device.type != "cuda":
        return device
    return torch.device("cuda", d.local_rank)


def check_plugins(plugins: Sequence[Any], label: str) -> None:
    """One line when a plugin of the strategy has not declared that it keeps the DDP rules."""
    # the class's own declaration, not an inherited one: a subclass that changes hooks (ER-ACE's criterion over
    # row positions on top of ER) must check the rules again
    bad = [type(p).__name__ for p in plugins if not vars(type(p)).get("supports_ddp", False)]
    if bad:
        raise ConfigError(f"strategy {label!r}: {bad[0]} does not support multi-process training (its per-batch "
                          "state is not proven identical on every rank; see cltoolbox.distributed); run it in "
                          "one process (no --nproc / torchrun)")


def check_strategy(entry: dict[str, Any]) -> None:
    """``check_plugins`` for one resolved strategy entry of a config (before any process group or run)."""
    from cltoolbox.build import build_plugins

    check_plugins(build_plugins(entry), entry["label"])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel (made once per training call: plugins may freeze parts of the
    model between experiences, and DDP fixes the trainable set when it is built)."""
    kwargs: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, **kwargs)  # buffers follow rank 0 at each forward


def all_reduce_grads(params: Sequence[torch.Tensor], world: int) -> None:
    """Average the gradients of ``params`` over ranks in one flat buffer (parameters that DDP does not see:
    plugin-owned prompts and keys, or a model run through a plugin's own forward)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (``value`` itself in one process): per-batch counts of the global batch."""
    if current() is None:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def gather_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The global batch's rows of a per-row tensor each rank computed for its shard (``Dist.shard_rows`` of an
    ``n``-row batch), in batch order on every rank; ``rows`` itself in one process."""
    d = current()
    if d is None:
        return rows
    width = -(-n // d.world)  # the largest shard: all_gather needs one shape
    dtype = rows.dtype
    if rows.is_floating_point() and rows.element_size() < 4:  # gloo has no all_gather for half types
        rows = rows.float()
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded.contiguous())
    spans = [Dist(r, d.world, r).shard_rows(n) for r in range(d.world)]
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, spans, strict=True)]).to(dtype)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    d = current()
    if d is None:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / d.world


def broadcast_state(learner) -> None:
    """Make every rank's model, plugin state and generator rank 0's (after each experience)."""
    if current() is None:
        return
    state = [learner.model.state_dict(), [p.state_dict() for p in learner.plugins], learner.generator.get_state()]
    dist.broadcast_object_list(state, src=0, device=learner.device if learner.device.type == "cuda" else None)
    if current().rank != 0:
        learner.model.load_state_dict(state[0])
        for p, s in zip(learner.plugins, state[1], strict=True):
            p.load_state_dict(s)
        learner.generator.set_state(state[2])


def barrier() -> None:
    if current() is not None:
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` (what each started process runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the action rank 0 decided for a run folder)."""
    if current() is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow_run(run_dir: Path, execute) -> tuple[str, dict[str, Any]]:
    """A rank other than 0 in ``run_in_folder``: take rank 0's decision for ``run_dir`` and train in step with
    it, writing nothing under the run folder. The session's files go to a scratch folder in the system temp
    dir (removed at the end); a resumed run reads rank 0's checkpoint from ``run_dir`` before rank 0 moves on.
    ``execute(scratch, action)`` runs the session; returns (action, its summary)."""
    import shutil
    import tempfile

    action = share(None)
    if isinstance(action, BaseException):  # rank 0 could not claim the folder: end the same way
        raise action
    if action == "skip":
        return action, {}
    scratch = Path(tempfile.mkdtemp(prefix=f"cltoolbox-rank{current().rank}-"))
    try:
        if action == "resume":
            for name in ("checkpoint/state.pt", "env.json"):
                if (run_dir / name).exists():
                    (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(run_dir / name, scratch / name)
        barrier()  # rank 0 writes only after every rank has read what it needs
        return action, execute(scratch, action)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def precheck(config: Any, overrides: Sequence[str], out: str | None, seeds: list[int] | None) -> None:
    """What ``--nproc`` checks once before starting processes (each would otherwise print the same error): the
    config is valid and every strategy keeps the rules."""
    from cltoolbox import config as cfgmod
    from cltoolbox.build import load_raw

    resolved = cfgmod.validate(load_raw(config, list(overrides), out, seeds))
    for entry in resolved["strategy"]:
        check_strategy(entry)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``cltoolbox <argv>`` in ``nproc`` processes with torchrun's environment; returns the worst exit
    code (a rank that fails makes the others fail at their next collective, so all end)."""
    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "cltoolbox.cli", *argv], env=env))
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)
