"""``report.html`` (one self-contained page: every figure inline, no script, no network), the figures
as PNG and every table as CSV. The same store gives the same bytes."""

from __future__ import annotations

import base64
import csv
import io
import os
from datetime import datetime
from html import escape
from pathlib import Path

from lorafactory.report.charts import Chart, all_charts
from lorafactory.report.rows import CharacterRow, read_rows
from lorafactory.workspace import Workspace, write_bytes_atomic

OPEN_ROWS = 24  # longer tables are folded under their figure

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; }
.caption { color: #444; }
"""


def _csv(table: list[dict]) -> bytes:
    buffer = io.StringIO()
    if table:
        writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    return buffer.getvalue().encode("utf-8")


def _value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _html_table(table: list[dict], links: list[dict[str, str]] | None = None) -> str:
    if not table:
        return "<p class='caption'>(no rows)</p>"
    head = "".join(f"<th>{escape(str(key))}</th>" for key in table[0])
    body = []
    for index, row in enumerate(table):
        cells = []
        for key, value in row.items():
            text = escape(_value(value))
            href = (links[index] if links else {}).get(key)
            cells.append(f"<td><a href='{escape(href)}'>{text}</a></td>" if href else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _character_table(rows: list[CharacterRow], workspace: Workspace, out: Path) -> tuple[list[dict], list[dict]]:
    table, links = [], []
    for r in rows:
        table.append(
            {
                "name": r.name,
                "copyright": r.copyright,
                "source": r.source,
                "popularity": r.popularity,
                "images": r.images,
                "step": r.best_step,
                "RecScore": r.recscore,
                "bikini": r.bikini,
                "BikiniPlus": r.bikini_plus,
                "status": r.status,
                "finished": r.finished_at.date().isoformat() if r.finished_at else None,
                "card": "card",
                "plot": "plot",
            }
        )
        char = workspace.character(r.slug)
        found = {
            "card": char.artifact("release") / "README.md",
            "plot": char.artifact("evaluate") / "metrics_plot.png",
        }
        links.append({key: os.path.relpath(path, out) for key, path in found.items() if path.is_file()})
        for key in ("card", "plot"):
            if key not in links[-1]:
                table[-1][key] = None
    return table, links


def _section(chart: Chart) -> str:
    figure = ""
    if chart.png is not None:
        data = base64.b64encode(chart.png).decode("ascii")
        figure = f"<img alt='{escape(chart.title)}' src='data:image/png;base64,{data}'>"
    table = _html_table(chart.table)
    if len(chart.table) > OPEN_ROWS:  # a long table folds away (a native HTML element: no script)
        table = f"<details><summary>the table ({len(chart.table)} rows)</summary>{table}</details>"
    return (
        f"<h2>{escape(chart.title)}</h2>{figure}<p class='caption'>{escape(chart.caption)}</p>"
        f"{table}<p class='caption'>Table: tables/{chart.name}.csv</p>"
    )


def write_report(
    store,
    workspace: Workspace,
    out: Path,
    since: datetime | None = None,
    copyright: str | None = None,
    source: str | None = None,
) -> Path:
    """Write the report into ``out``; returns the path of ``report.html``."""
    out = Path(out).expanduser().resolve()
    rows, stages = read_rows(store, since, copyright, source)
    charts = all_charts(rows, stages)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for chart in charts:
        if chart.png is not None:
            write_bytes_atomic(out / "figures" / f"{chart.name}.png", chart.png)
        write_bytes_atomic(out / "tables" / f"{chart.name}.csv", _csv(chart.table))
    characters, links = _character_table(rows, workspace, out)
    write_bytes_atomic(out / "tables" / "characters.csv", _csv(characters))
    filters = [f"since {since.date().isoformat()}" if since else "", copyright or "", source or ""]
    scope = ", ".join(f for f in filters if f) or "everything in the store"
    summary = (
        f"{len(rows)} character{'' if len(rows) == 1 else 's'} ({scope}); "
        f"{sum(1 for r in rows if r.status == 'succeeded')} whose latest run succeeded, "
        f"{sum(1 for r in rows if r.status == 'failed')} failed."
    )
    if not rows:
        summary = f"No character has run yet ({scope}): run some, then `lorafactory report` again."
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lorafactory report</title>"
        f"<style>{STYLE}</style></head><body><h1>lorafactory report</h1><p>{escape(summary)}</p>"
        + "".join(_section(chart) for chart in charts)
        + f"<h2>Characters</h2>{_html_table(characters, links)}</body></html>\n"
    )
    path = out / "report.html"
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
