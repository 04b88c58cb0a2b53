"""Evaluation: before training (the init row) and after every experience, test every test experience.

One pass per test experience gives class-IL accuracy (argmax over all classes), task-IL accuracy (argmax
over the classes of that experience's task), the mean cross-entropy for each, per-class counts, class-IL
top-5 accuracy, and the class-IL confusion counts of the latest model evaluated.
Future experiences are evaluated too: the transfer matrix needs them. Results go into preallocated
tensors (:class:`History`), so bookkeeping per experience stays constant as the stream grows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cltoolbox.loop import Learner
from cltoolbox.stream import Stream

SETTINGS = ("class_il", "task_il")


class History:
    """Accuracy, loss and counts for rows trained_exp = -1..T-1 (index 0..T) x K eval experiences
    (K = T unless the stream revisits tasks)."""

    def __init__(self, n_experiences: int, n_classes: int, n_eval: int | None = None) -> None:
        T, C = n_experiences, n_classes
        K = T if n_eval is None else n_eval
        self.accuracy = torch.full((T + 1, K, 2), float("nan"), dtype=torch.float64)
        self.loss = torch.full((T + 1, K, 2), float("nan"), dtype=torch.float64)
        self.n_samples = torch.zeros(K, dtype=torch.long)
        self.class_total = torch.zeros(K, C, dtype=torch.long)
        self.class_correct = torch.zeros(T + 1, K, 2, C, dtype=torch.int32)  # in every checkpoint: keep it small
        self.rows_done = torch.zeros(T + 1, dtype=torch.bool)
        self.top5 = torch.full((T + 1, K), float("nan"), dtype=torch.float64)  # class-IL, true label in the top 5
        self.confusion = torch.zeros(C, C, dtype=torch.int32)  # (true, predicted) class-IL, latest row evaluated

    def matrix(self, setting: str) -> np.ndarray:
        return self.accuracy[:, :, SETTINGS.index(setting)].numpy().copy()

    # Rows read Python lists (tolist) rather than indexing tensors element by element: a 100-experience
    # stream has 202,000 per-class rows, and per-element tensor indexing took seconds.
    def accuracy_rows(self) -> list[dict[str, Any]]:
        rows = []
        acc, loss, n_samples = self.accuracy.tolist(), self.loss.tolist(), self.n_samples.tolist()
        for i in torch.nonzero(self.rows_done).flatten().tolist():
            for j in range(self.accuracy.shape[1]):
                for s, setting in enumerate(SETTINGS):
                    rows.append({
                        "trained_exp": i - 1, "eval_exp": j, "setting": setting,
                        "accuracy": acc[i][j][s], "loss": loss[i][j][s], "n_samples": n_samples[j],
                    })
        return rows

    def per_class_rows(self) -> list[dict[str, Any]]:
        rows = []
        T = self.accuracy.shape[1]
        present = [torch.nonzero(self.class_total[j] > 0).flatten().tolist() for j in range(T)]
        total, correct = self.class_total.tolist(), self.class_correct.tolist()
        for i in torch.nonzero(self.rows_done).flatten().tolist():
            for j in range(T):
                for c in present[j]:
                    for s, setting in enumerate(SETTINGS):
                        rows.append({
                            "trained_exp": i - 1, "eval_exp": j, "setting": setting, "class": c,
                            "n_samples": total[j][c], "n_correct": correct[i][j][s][c],
                        })
        return rows

    def old_new_rows(self, first_seen: list[int]) -> list[dict[str, Any]]:
        """Accuracy on the old and the new test samples after each experience (PyCIL's old/new split).

        After training row r, "new" is every eval experience first trained at r and "old" every one trained
        before it; each side is sample-weighted (accuracy over all of its test samples). On a class-incremental
        stream these are the classes introduced at r and the classes learnt before; a step that only revisits
        (recurring streams) has no new samples (NaN). The gap old - new is what bias corrections (BiC, WA) close.
        """
        acc, n = self.accuracy.tolist(), self.n_samples.tolist()
        rows = []
        for r in torch.nonzero(self.rows_done).flatten().tolist():
            if r == 0:
                continue
            groups = {"old": [j for j, f in enumerate(first_seen) if 0 < f < r],
                      "new": [j for j, f in enumerate(first_seen) if f == r]}
            for s, setting in enumerate(SETTINGS):
                row: dict[str, Any] = {"trained_exp": r - 1, "setting": setting}
                for side, js in groups.items():
                    total = sum(n[j] for j in js)
                    row[f"n_{side}"] = total
                    row[f"accuracy_{side}"] = (sum(acc[r][j][s] * n[j] for j in js) / total) if total else float("nan")
                rows.append(row)
        return rows

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class _TestSet:
    """The test experiences of one stream concatenated, with what every evaluation pass reuses: labels, the
    mask of each sample's task-IL classes, the keys of the per-class counts, sizes and task ids."""

    def __init__(self, stream: Stream, device: torch.device, eval_batch_size: int) -> None:
        tests = stream.eval_experiences
        C, K = stream.n_classes, len(tests)
        sizes = [int(e.y_test.shape[0]) for e in tests]
        self.bounds = [(sum(sizes[:j]), sum(sizes[: j + 1])) for j in range(K)]
        self.y = torch.cat([e.y_test for e in tests]).to(device)
        self.task_ids = [torch.full_like(e.y_test, e.task_id) for e in tests]
        # every test experience's keys in eval_batch_size chunks, chunked per experience (a chunk's values never
        # depend on the rest of the stream), fetched in one pass so file-backed sets keep their loader busy
        self.key_chunks, self.task_chunks = [], []
        for e, tids in zip(tests, self.task_ids, strict=True):
            keys = stream.keys(e.test)
            self.key_chunks += [keys[s : s + eval_batch_size] for s in range(0, len(keys), eval_batch_size)]
            self.task_chunks += [tids[s : s + eval_batch_size] for s in range(0, len(keys), eval_batch_size)]
        self.exp_of = torch.repeat_interleave(torch.arange(K, device=device), torch.tensor(sizes, device=device))
        self.not_own = torch.ones(K, C, dtype=torch.bool, device=device)  # True: not the experience's class
        for j, e in enumerate(tests):
            self.not_own[j, list(e.classes)] = False
        # experiences over all classes (domain-incremental streams): their task-IL logits are the class-IL
        # ones, so the argmax and the cross-entropy (~1/5 of a pass on Permuted-MNIST) are computed once
        self.all_own = (~self.not_own.any(1)).tolist()
        self.any_masked = not all(self.all_own)
        # per-class count keys: (experience, setting, class) flattened, for one bincount per pass
        self.keys = torch.stack([(self.exp_of * 2 + s) * C + self.y for s in range(2)])
        self.n_samples = torch.tensor(sizes, dtype=torch.long)
        self.class_total = torch.stack([torch.bincount(e.y_test, minlength=C).cpu() for e in tests]) if K else None


@torch.inference_mode()
def evaluate_stream(learner: Learner, stream: Stream, trained_exp: int, history: History) -> None:
    """Fill row ``trained_exp`` (-1 = before training) of ``history``.

    Logits are computed per test experience, in ``eval_batch_size`` chunks (the batches, hence the values,
    do not depend on the rest of the stream); the bookkeeping (task-IL masking, argmax, per-class counts)
    then runs once over the concatenated logits instead of ~20 small ops per experience, and accuracies and
    losses are written as one tensor per pass, not as Python floats element by element.
    """
    if stream.multi_label:  # multi-hot labels: mAP / CF1 / OF1 instead of accuracy (cltoolbox.multilabel)
        from cltoolbox.multilabel import evaluate_multi_label

        return evaluate_multi_label(learner, stream, trained_exp, history)
    row = trained_exp + 1
    C = stream.n_classes
    tests = stream.eval_experiences
    if not tests:
        history.rows_done[row] = True
        return
    cached = learner._test_set
    if cached is None or cached[0] is not stream:
        learner._test_set = cached = (stream, _TestSet(stream, learner.device, learner.config.eval_batch_size))
    ts = cached[1]
    learner.model.eval()  # once per pass: learner.logits would switch eval/train per test experience
    inputs = stream.batches(ts.key_chunks, learner.device, learner.workers())
    parts = learner._chunk_logits(inputs, ts.key_chunks, ts.task_chunks)
    learner.model.train()  # the mode learner.logits leaves the model in
    logits = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else \
        torch.empty(0, C, device=learner.device)
    # task-IL: the experience's own classes are known (its task identity), so mask the rest
    # the (N, C) mask is gathered per pass rather than kept: it can be large (many classes and test samples)
    task_logits = logits.masked_fill(ts.not_own[ts.exp_of], float("-inf")) if ts.any_masked else logits
    pred = logits.argmax(1)
    correct = torch.stack((pred, task_logits.argmax(1) if ts.any_masked else pred)) == ts.y
    in_top5 = (logits.topk(min(5, C), 1).indices == ts.y[:, None]).any(1).double()
    history.confusion = torch.bincount(ts.y * C + pred, minlength=C * C).view(C, C).to(torch.int32).cpu()
    as_double = correct.double()
    acc, loss, top5 = [], [], []
    nan = torch.full((2,), float("nan"), dtype=torch.float64, device=logits.device)
    for j, (a, b) in enumerate(ts.bounds):
        if b == a:  # an empty test experience has no accuracy or loss (they stay NaN)
            acc.append(nan)
            loss.append(nan)
            top5.append(nan[0])
            continue
        y = tests[j].y_test
        acc.append(as_double[:, a:b].mean(1))
        top5.append(in_top5[a:b].mean())
        class_il = F.cross_entropy(logits[a:b].float(), y)
        task_il = class_il if ts.all_own[j] else F.cross_entropy(task_logits[a:b].float(), y)
        loss.append(torch.stack((class_il, task_il)).double())
    K = len(tests)
    history.accuracy[row] = torch.stack(acc).cpu()
    history.loss[row] = torch.stack(loss).cpu()
    history.top5[row] = torch.stack(top5).cpu()
    counts = torch.bincount(ts.keys[correct], minlength=K * 2 * C)
    history.class_correct[row] = counts.view(K, 2, C).cpu()
    history.n_samples.copy_(ts.n_samples)
    history.class_total.copy_(ts.class_total)
    history.rows_done[row] = True
