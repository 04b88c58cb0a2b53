"""The README's "write your own strategy" example, run exactly as a user would: files on disk, YAML by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cltoolbox

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_examples() -> dict[str, str]:
    text = README.read_text()
    blocks = re.findall(r"<!-- readme-example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def test_readme_has_the_examples() -> None:
    assert {"my_strategy.py", "my_experiment.yaml"} <= set(readme_examples())


@pytest.mark.slow
def test_custom_strategy_from_readme_runs_by_name_and_reduces_forgetting(tmp_path: Path) -> None:
    for name, body in readme_examples().items():
        (tmp_path / name).write_text(body)
    results = cltoolbox.run(tmp_path / "my_experiment.yaml", out=str(tmp_path / "runs"), quiet=True)
    by_name = {r["labels"]["strategy"]: r for r in results}
    assert set(by_name) == {"naive", "l2_anchor"}
    run_dir = Path(by_name["l2_anchor"]["run_dir"])
    assert (run_dir / "DONE").exists()
    assert "l2_anchor" in (run_dir / "config.yaml").read_text()
    # the anchor must do what it claims on real data: forget less than plain fine-tuning
    assert by_name["l2_anchor"]["class_il"]["forgetting"] < by_name["naive"]["class_il"]["forgetting"] - 0.02
