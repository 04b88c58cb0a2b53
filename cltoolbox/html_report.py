"""One self-contained HTML results page (``cltoolbox report RUNS --html``).

The page holds everything inline, so it can be mailed or archived alone: the report's figures as base64 PNG,
its summary tables and a table of every run, sortable by a click on a column header (a few lines of inline
JavaScript; numbers sort as numbers), each run's ``config.yaml`` and ``env.json`` one click away
(``<details>``), and relative links to the run folders (they work while the page sits where it was written,
next to the runs). Nothing is loaded from the network.
"""

from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
td.t,th.t{text-align:left}th{background:#f3f3f3;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.figs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;max-width:48%}figure img{max-width:100%;height:auto}
figcaption{font-size:.8em;color:#555}pre{background:#f8f8f8;padding:.5em;max-height:30em;overflow:auto;
text-align:left;font-size:.85em}details summary{cursor:pointer;color:#0645ad}.note{color:#555;font-size:.85em}
"""

# a click on a header sorts its table's body by that column (data-v: the number to sort by)
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var v = cell.getAttribute("data-v");
        return v !== null && v !== "" ? parseFloat(v) : cell.textContent.trim().toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === "number" && isNaN(x)) return 1;
        if (typeof y === "number" && isNaN(y)) return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _cell(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    f = _num(v)
    if f is None or isinstance(v, bool):
        return f'<td class="t">{html.escape("" if v is None or (isinstance(v, float) and v != v) else str(v))}</td>'
    return f'<td data-v="{f}">{f * scale:.{digits}f}</td>'


def _table(headers: list[str], rows: list[list[str]], text_cols: int = 0) -> str:
    th = "".join(f'<th class="t">{html.escape(h)}</th>' if i < text_cols else f"<th>{html.escape(h)}</th>"
                 for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="sortable"><thead><tr>{th}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _summary_tables(out: Path) -> list[str]:
    """The report's table_<setting>.md as sortable HTML (the same cells, means ± std as text, means to sort)."""
    import pandas as pd

    from cltoolbox.tables import SETTING_NAMES

    parts = []
    for setting, title in SETTING_NAMES.items():
        path = out / f"table_{setting}.csv"
        if not path.exists():
            continue
        table = pd.read_csv(path)
        md = (out / f"table_{setting}.md").read_text().splitlines()
        rows_md = [ln for ln in md if ln.startswith("|")]
        headers = [c.strip() for c in rows_md[0].strip("|").split("|")] if rows_md else list(table.columns)
        rows = []
        for ln in rows_md[2:]:
            cells = [c.strip().replace("**", "") for c in ln.strip("|").split("|")]
            tds = []
            for c in cells:
                head = c.split("±")[0].strip().replace("—", "")
                v = _num(head)
                tds.append(f'<td data-v="{v}">{html.escape(c)}</td>' if v is not None
                           else f'<td class="t">{html.escape(c)}</td>')
            rows.append(tds)
        notes = [ln for ln in md if ln and not ln.startswith("|")]
        parts.append(f"<h2>Summary: {html.escape(title)}</h2>" + _table(headers, rows, text_cols=2)
                     + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes))
    return parts


def _read(path: Path, limit: int = 200_000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path.name}: {e.strerror or type(e).__name__})"
    return text if len(text) <= limit else text[:limit] + "\n... (truncated)"


def _runs_table(metrics: Any, out: Path) -> str:
    """One row per run: labels, headline metrics, a relative link and its config/env in <details>."""
    wide = metrics.pivot_table(index="run", columns="setting", values="acc", aggfunc="first")
    first = metrics.drop_duplicates("run").set_index("run")
    cls = metrics[metrics.setting == "class_il"].set_index("run")
    headers = ["experiment", "strategy", "scenario", "seed", "ACC class-IL (%)", "ACC task-IL (%)",
               "forgetting (pp)", "BWT (pp)", "wall (s)", "CPU (s)", "run folder"]
    rows = []
    for run in first.index:
        r = first.loc[run]
        c = cls.loc[run] if run in cls.index else {}
        rel = os.path.relpath(run, out)
        link = Path(rel).as_posix()
        details = "".join(
            f"<details><summary>{name}</summary><pre>{html.escape(_read(Path(run) / name))}</pre></details>"
            for name in ("config.yaml", "env.json"))
        rows.append([
            _cell(r.get("experiment")), _cell(r.get("strategy")), _cell(r.get("scenario")), _cell(r.get("seed"), 1, 0),
            _cell(wide.loc[run].get("class_il"), 100, 1), _cell(wide.loc[run].get("task_il"), 100, 1),
            _cell(c.get("forgetting"), 100, 1), _cell(c.get("bwt"), 100, 1),
            _cell(r.get("wall_s"), 1, 1), _cell(r.get("cpu_s"), 1, 1),
            f'<td class="t"><a href="{html.escape(link)}/">{html.escape(link)}</a>{details}</td>',
        ])
    return "<h2>Runs</h2>" + _table(headers, rows, text_cols=3)


def _figures(paths: list[Path]) -> str:
    items = []
    for p in paths:
        if p.suffix != ".png":
            continue
        data = base64.b64encode(p.read_bytes()).decode()
        items.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    return '<h2>Figures</h2><div class="figs">' + "\n".join(items) + "</div>" if items else ""


def write_html(runs: list[str | Path], out: str | Path, written: dict[str, list[Any]] | None = None) -> Path:
    """``<out>/report.html`` for the runs under ``runs``; ``written`` is what ``report.report`` wrote into
    ``out`` (it is run first when not given)."""
    from cltoolbox import report as rep
    from cltoolbox.results import load

    out = Path(out)
    if written is None:
        written = rep.report(runs, out)
    data = load(list(runs), dropped=[])
    metrics = data["metrics"]
    dropped = written.get("dropped") or []
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_runs = metrics["run"].nunique()
    parts = [f"<h1>cltoolbox results</h1><p class=\"note\">{n_runs} run(s) from "
             f"{html.escape(', '.join(map(str, runs)))}; written {when}. Click a column header to sort.</p>"]
    parts += _summary_tables(out)
    parts.append(_figures(list(written.get("figures") or [])))
    parts.append(_runs_table(metrics, out))
    if dropped:
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>{html.escape(str(r))}: {html.escape(w)}</li>"
                                                      for r, w in dropped) + "</ul>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>cltoolbox results</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    path = out / "report.html"
    from cltoolbox.results import atomic_write_text

    atomic_write_text(path, page)
    return path


def page_summary(path: str | Path) -> dict[str, Any]:
    """What a page holds (for tests and scripts): number of embedded images, tables and run details."""
    text = Path(path).read_text()
    return {"images": text.count('src="data:image/png;base64,'), "tables": text.count('<table class="sortable">'),
            "details": text.count("<details>"), "bytes": len(text.encode()),
            "external": [m for m in ("http://", "https://") if f'src="{m}' in text or f"href=\"{m}" in text]}


