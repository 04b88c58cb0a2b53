"""Evaluation: before training (the init row) and after every experience, test every test experience.

One pass per test experience gives class-IL accuracy (argmax over all classes), task-IL accuracy (argmax
over the classes of that experience's task), the mean cross-entropy for each, and per-class counts.
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@torch.inference_mode()
def evaluate_stream(learner: Learner, stream: Stream, trained_exp: int, history: History) -> None:
    """Fill row ``trained_exp`` (-1 = before training) of ``history``."""
    row = trained_exp + 1
    C = stream.n_classes
    tests = stream.eval_experiences
    if tests:
        learner.model.eval()  # once per pass: learner.logits would switch eval/train per test experience
    for j, exp in enumerate(tests):
        y = exp.y_test
        tids = torch.full_like(y, exp.task_id)
        logits = learner._eval_logits(exp.x_test, tids)
        # task-IL: the experience's own classes are known (its task identity), so mask the rest
        own = torch.zeros(C, dtype=torch.bool, device=logits.device)
        own[list(exp.classes)] = True
        task_logits = logits.masked_fill(~own, float("-inf"))
        history.n_samples[j] = y.shape[0]
        history.class_total[j] = torch.bincount(y, minlength=C).cpu()
        for s, out in enumerate((logits, task_logits)):
            correct = out.argmax(1) == y
            if y.shape[0]:
                history.accuracy[row, j, s] = correct.double().mean().item()
                history.loss[row, j, s] = F.cross_entropy(out.float(), y).item()
            history.class_correct[row, j, s] = torch.bincount(y[correct], minlength=C).cpu()
    if tests:
        learner.model.train()  # the mode learner.logits leaves the model in
    history.rows_done[row] = True
