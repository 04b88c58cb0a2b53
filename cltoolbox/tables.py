"""The names and the number format that every printed table shares: the summary metrics (their names, which
direction is better, their unit in reports), the settings, and "mean ± std" over seeds. ``cltoolbox run``,
``sweep``, ``transfer`` and ``tune`` summaries and ``cltoolbox report`` all read them from here."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # as tables print it
    higher_is_better: bool
    unit: str  # in report tables: "%" for accuracies, "pp" (percentage points) for their differences

    @property
    def header(self) -> str:
        """A report table's column header, e.g. "Forgetting (pp)"."""
        return f"{self.name[0].upper()}{self.name[1:]} ({self.unit})"


# metrics.json's summary metrics (cltoolbox.metrics.summary), by key
METRICS: dict[str, Metric] = {
    "acc": Metric("ACC", True, "%"),
    "acc_weighted": Metric("weighted ACC", True, "%"),
    "aia": Metric("AIA", True, "%"),
    "bwt": Metric("BWT", True, "pp"),
    "fwt": Metric("FWT", True, "pp"),
    "forgetting": Metric("forgetting", False, "pp"),
    "forgetting_last": Metric("forgetting (last)", False, "pp"),
}
SETTING_NAMES = {"class_il": "class-IL", "task_il": "task-IL"}


def format_mean_std(mean: float | None, std: float | None = None, digits: int = 3, scale: float = 1.0,
                    sep: str = " ± ", signed: bool = False) -> str:
    """``mean ± std`` with ``digits`` decimals after multiplying by ``scale``; the std is left out when None or
    NaN, and an undefined mean (None, NaN) is "n/a". ``signed``: always print the mean's sign."""
    if mean is None or mean != mean:
        return "n/a"
    text = f"{mean * scale:{'+' if signed else ''}.{digits}f}"
    return text if std is None or std != std else f"{text}{sep}{std * scale:.{digits}f}"


def mean_std(values: Iterable[float | None], digits: int = 3, scale: float = 1.0, sep: str = " ± ",
             signed: bool = False) -> str:
    """``mean ± sample std`` of per-seed values (std 0 for one value), scaled first; undefined values (None,
    NaN) are left out, and none left gives "n/a"."""
    v = [float(x) * scale for x in values if x is not None and x == x]
    if not v:
        return "n/a"
    return format_mean_std(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, digits, 1.0, sep, signed)
