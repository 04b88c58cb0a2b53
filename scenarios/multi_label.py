"""Multi-label class-incremental learning (MLCIL).

The protocol of Dong et al. 2023 ("Knowledge Restore and Transfer for Multi-Label Class-Incremental Learning",
ICCV; KRT) that MULTI-LANE (De Min et al. 2024, "Less is more: Summarizing Patch Tokens for efficient
Multi-Label Class-Incremental Learning", CoLLAs) follows: the classes are split into experiences; experience
t trains on every image that holds at least one of its classes, annotated with *its classes only* (labels of
earlier and later experiences are missing, so an old class present in a new image reads as absent). An image
holding classes of two experiences is therefore trained twice, each time with that experience's labels.
Test sets carry every label: test experience t holds the test images with one of its classes, and the evaluator
scores, after each experience, the classes seen so far on the test images holding one of them
(``cltoolbox.multilabel``). ``partial_labels: false`` annotates training images with every class seen so far
(an easier reference setting, not the protocol).
"""

from __future__ import annotations

from typing import Literal

import torch

from cltoolbox.data.base import Dataset
from cltoolbox.errors import ConfigError
from cltoolbox.registry import register_scenario
from cltoolbox.scenarios.incremental import class_order_list, class_splits
from cltoolbox.stream import Experience, Samples, Stream


@register_scenario("multi_label", test_dataset=None)
def multi_label(
    data: Dataset,
    seed: int,
    n_experiences: int | None = None,
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed",
    first_classes: int | None = None,
    classes_per_exp: int | None = None,
    partial_labels: bool = True,
) -> Stream:
    """Multi-label class-IL (KRT/MULTI-LANE protocol): images with a new class train in its experience, only
    the experience's labels annotated; needs a multi-label dataset (mnist5k_grid, digits_grid, voc_multilabel,
    coco_multilabel)."""
    if data.y_train.dim() != 2:
        raise ConfigError(f"scenario.dataset: multi_label needs a multi-label dataset (multi-hot labels), and "
                          f"{data.name!r} has one label per sample; use mnist5k_grid, digits_grid, voc_multilabel "
                          "or coco_multilabel")
    C = data.n_classes
    order = class_order_list(C, class_order, seed)
    sizes = class_splits(C, n_experiences, first_classes, classes_per_exp)
    y_train, y_test = data.y_train.cpu(), data.y_test.cpu()
    experiences, start = [], 0
    for i, size in enumerate(sizes):
        classes = tuple(order[start : start + size])
        start += size
        own = torch.zeros(C, dtype=torch.int64)
        own[list(classes)] = 1
        annotated = own if partial_labels else torch.zeros(C, dtype=torch.int64).index_fill_(
            0, torch.tensor(order[:start]), 1)
        tr = torch.nonzero((y_train * own).sum(1) > 0).flatten()
        te = torch.nonzero((y_test * own).sum(1) > 0).flatten()
        if len(tr) == 0 or len(te) == 0:
            raise ConfigError(f"scenario: experience {i} (classes {list(classes)}) has no "
                              f"{'training' if len(tr) == 0 else 'test'} image; choose another class split")
        experiences.append(Experience(i, 0, classes, Samples(data.train, tr, y_train[tr] * annotated),
                                      Samples(data.test, te, y_test[te])))
    return Stream(f"multi_label-{data.name}", experiences, C, data.input_shape, order, "multi_label", False,
                  info={"multi_label": True, "partial_labels": partial_labels})
