"""Online (task-free) class-incremental streams: many small chunks, optionally with blurry task boundaries."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.params import Interval, PositiveInt
from cltoolbox.registry import register_scenario
from cltoolbox.scenarios.recurring import ClassSubsets, resolve_class_order, task_experience
from cltoolbox.stream import Experience, Samples, Stream


def blurred_pools(task_indices: list[torch.Tensor], blur: float, g: torch.Generator) -> list[torch.Tensor]:
    """The sample indices each task's chunks are cut from, after moving ``round(blur * n_k)`` randomly chosen
    samples of every task k into its neighbours: half to task k-1 and half to task k+1 (all to the one
    neighbour of the first and last task; the odd one to k+1). Each pool is shuffled."""
    K = len(task_indices)
    pools: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for k, idx in enumerate(task_indices):
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
        n_move = round(blur * idx.shape[0])
        moved, kept = idx[:n_move], idx[n_move:]
        pools[k].append(kept)
        if k == 0:
            pools[1].append(moved)
        elif k == K - 1:
            pools[K - 2].append(moved)
        else:
            half = n_move // 2
            pools[k - 1].append(moved[:half])
            pools[k + 1].append(moved[half:])
    out = []
    for parts in pools:
        pool = torch.cat(parts)
        out.append(pool[torch.randperm(pool.shape[0], generator=g)])
    return out


@register_scenario("online", test_params={"n_tasks": 2, "chunk_size": 250, "blur": 0.1})
def online(
    data: Dataset,
    seed: int,
    n_tasks: int = 5,
    chunk_size: PositiveInt = 10,
    blur: Annotated[float, Interval(0, 0.5, why="above 0.5 a task's chunks would hold more samples of other "
                                                "tasks than its own")] = 0.0,
    boundaries: bool = False,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
) -> Stream:
    """Online task-free class-IL: each task's data cut into small chunks; optional blurry task boundaries.

    The classes (in ``class_order``) are split evenly into ``n_tasks`` tasks as in ``class_incremental``;
    each task's training samples are shuffled (seeded) and cut into experiences of ``chunk_size`` samples
    (the last chunk of a task may be smaller), trained task after task. Use ``train.epochs: 1`` (one pass)
    and ``train.batch_size`` <= chunk_size for the online protocol (Aljundi et al. 2019, "Task-Free
    Continual Learning"; Mai et al. 2022, "Online Continual Learning in Image Classification: An Empirical
    Survey").

    ``blur`` in [0, 0.5]: that fraction of each task's samples is moved into the chunks of its neighbouring
    tasks (half to the previous, half to the next), so classes leak across task boundaries (the blurry
    setting of Bang et al. 2021, "Rainbow Memory"; Koh et al. 2022).

    ``boundaries: false`` (default): the stream is task-free: every chunk has task id 0, its classes are
    the classes present in it, and ``info`` records no task boundaries. ``boundaries: true``: every chunk
    carries the id of the task it belongs to (class-IL still: no task ids at test time).

    Evaluation is on the test sets of the underlying tasks: ``test_experiences`` holds one entry per task
    (its classes, all their training and test samples) and ``schedule`` maps each chunk to its task, so the
    accuracy matrices have one column per task and one row per chunk. ``schedule`` and
    ``test_experiences`` are for the evaluator; a task-free strategy must not read them.
    """
    C = data.n_classes
    if n_tasks < 1 or C % n_tasks:
        raise ConfigError(f"scenario.n_tasks: {C} classes cannot be split evenly into {n_tasks} tasks; "
                          f"choose a divisor of {C}")
    if blur > 0 and n_tasks < 2:
        raise ConfigError("scenario.blur: blurry boundaries need at least two tasks; set n_tasks >= 2 or blur: 0")
    order = resolve_class_order(C, class_order, seed)
    per = C // n_tasks
    task_classes = [tuple(order[k * per:(k + 1) * per]) for k in range(n_tasks)]
    g = torch.Generator().manual_seed(seed)
    task_indices = [torch.nonzero(torch.isin(data.y_train, torch.tensor(cls))).flatten() for cls in task_classes]
    pools = blurred_pools(task_indices, blur, g)

    # the training indices in stream order; chunks are slices of it
    stream_idx = torch.cat(pools)
    y_all = data.y_train[stream_idx]
    test = ClassSubsets(data.test)
    experiences, schedule, start = [], [], 0
    for k, pool in enumerate(pools):
        for s in range(0, pool.shape[0], chunk_size):
            a, b = start + s, start + min(s + chunk_size, pool.shape[0])
            y = y_all[a:b]
            classes = tuple(sorted(torch.unique(y).tolist()))
            experiences.append(Experience(len(experiences), k if boundaries else 0, classes,
                                          Samples(data.train, stream_idx[a:b], y), test(classes)))
            schedule.append(k)
        start += pool.shape[0]
    train = ClassSubsets(data.train)
    tests = [task_experience(k, k if boundaries else 0, cls, train, test) for k, cls in enumerate(task_classes)]
    info = {"chunk_size": chunk_size, "blur": blur, "boundaries": boundaries, "task_free": not boundaries}
    return Stream(f"online-{data.name}", experiences, C, data.input_shape, order, "class_incremental",
                  task_labels=False, info=info, test_experiences=tests, schedule=schedule)
