"""MEMO: Memory-efficient Expandable MOdel.

Zhou, Wang, Ye and Zhan 2023, "A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental Learning"
(ICLR). DER's expansion (``strategies/der_expand.py``) with the network split in two: shallow layers, whose
features are general and change little between tasks, are *generalised blocks* shared by every task; only the
deep layers are *specialised blocks* expanded per task. So each step adds one deep block instead of a whole
extractor, and the parameters saved can pay for exemplars (the paper's "603 exemplars" accounting).

* Split (``strategies/expansion.py``): on ``mlp`` the generalised block is every hidden layer but the last and
  the specialised block is the last hidden layer (2x400: the first 400-unit layer is shared, each task adds a
  400x400 layer, 160k parameters against DER's 474k); on ``resnet18_reduced`` the stem and the first three
  stages are shared and the last stage (two residual blocks) is specialised, as the paper's ResNet split
  (it shares the early stages and specialises the last one).
* Training, as DER: the new specialised block starts from the previous one's weights (the authors' code),
  earlier specialised blocks are frozen, the classifier reads the concatenated deep features (old weights
  inherited), CE over the classes seen so far plus the auxiliary new-classes-plus-"old" classifier on the new
  block's features (lambda_a = 1), then class-balanced finetuning of the classifier on the exemplars.
* The generalised blocks are trained with the first task and frozen afterwards (``train_shared: false``, with
  their normalisation statistics): then the frozen specialised blocks see exactly the inputs they were
  trained on. The authors' code exposes the same switch (``train_base``); training them on later tasks makes
  the old blocks' inputs drift.

``cost.expansion_params`` / ``params_exp_<i>``: shared block + every specialised block + classifier.
"""

from __future__ import annotations

from typing import Annotated, Literal

from cltoolbox.params import Min, NonNegative, Positive, PositiveInt
from cltoolbox.plugin import Plugin
from cltoolbox.registry import register_strategy
from cltoolbox.strategies.der_expand import DERExpandPlugin


class MEMOPlugin(DERExpandPlugin):
    name = "memo"
    shared = True

    def __init__(self, memory_size: int, aux_weight: float, balanced_epochs: int, balanced_lr: float,
                 selection: str = "herding", train_shared: bool = False) -> None:
        super().__init__(memory_size, aux_weight, balanced_epochs, balanced_lr, selection)
        self.train_shared = train_shared

    def _after_first(self, learner) -> None:
        if not self.train_shared:
            self.branches.split.freeze_trunk()


@register_strategy("memo", test_params={"memory_size": 60, "balanced_epochs": 2})
def memo(memory_size: PositiveInt = 500, aux_weight: NonNegative = 1.0, balanced_epochs: Annotated[int, Min(0)] = 30,
         balanced_lr: Positive = 0.05,
         selection: Literal["herding", "random"] = "herding", train_shared: bool = False) -> list[Plugin]:
    """MEMO (Zhou et al. 2023): shared generalised (shallow) blocks, a specialised deep block added per task,
    DER's auxiliary loss and class-balanced classifier finetuning.

    ``memory_size`` (>= 1): class-balanced exemplars; ``aux_weight`` (>= 0): the auxiliary loss weight (1, as
    DER); ``balanced_epochs`` (>= 0, 0 = off), ``balanced_lr`` (> 0): classifier finetuning on the exemplars;
    ``selection``: herding or random exemplars; ``train_shared``: keep training the generalised blocks after the
    first task (default: frozen).
    """
    return [MEMOPlugin(memory_size, aux_weight, balanced_epochs, balanced_lr, selection, train_shared)]
