"""One metric-name table and one mean ± std formatter (cltoolbox.tables) behind every printed table: the strings
are the ones the run, transfer, tuning and report tables printed with their own copies."""

from __future__ import annotations

import math

from cltoolbox.report import TABLE_METRICS
from cltoolbox.tables import METRICS, SETTING_NAMES, format_mean_std, mean_std
from cltoolbox.tuning import SELECT_METRICS


def test_mean_std_formats_of_each_table() -> None:
    seeds = [0.91234, 0.88765, None, math.nan]  # undefined values are left out
    assert mean_std(seeds, sep="±") == "0.900±0.017"  # cltoolbox run / sweep
    assert mean_std([-0.0123, 0.0456], sep="±", signed=True) == "+0.017±0.041"  # cltoolbox transfer
    assert mean_std([0.5], digits=1, scale=100) == "50.0 ± 0.0"  # experiments' scripts, one seed
    assert mean_std([None, math.nan]) == "n/a"
    assert format_mean_std(0.8123, 0.0123, digits=1, scale=100) == "81.2 ± 1.2"  # tuning report
    assert format_mean_std(0.8123, math.nan, digits=1, scale=100) == "81.2"
    assert format_mean_std(math.nan, 0.1) == "n/a"
    assert format_mean_std(-1.25, 0.5, 2).replace("-", "−") == "−1.25 ± 0.50"  # report's Markdown cells


def test_one_metric_table_for_report_and_tuning() -> None:
    assert {k: v[0] for k, v in TABLE_METRICS.items()} == {
        "acc": "ACC (%)", "aia": "AIA (%)", "forgetting": "Forgetting (pp)", "bwt": "BWT (pp)", "fwt": "FWT (pp)"}
    assert SELECT_METRICS == {k: m.higher_is_better for k, m in METRICS.items()}
    assert [k for k, better in SELECT_METRICS.items() if not better] == ["forgetting", "forgetting_last"]
    assert SETTING_NAMES == {"class_il": "class-IL", "task_il": "task-IL"}
