"""The report page: Markdown lines with tables (each also written in full to tables/<name>.csv) and figures, and
the same page as one self-contained HTML file (inline CSS, no scripts) whose wide tables scroll inside their own
box, so the page itself never scrolls sideways."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import markdown
import pandas as pd

NOT_RECORDED = "not recorded"
HTML_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45;
overflow-wrap:anywhere}}
.table{{overflow-x:auto;max-width:100%;margin:0.5em 0 1em}}
table{{border-collapse:collapse;font-size:0.8em}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:normal}}
th{{background:#f3f3f3}}img{{max-width:100%;height:auto;display:block}}code{{background:#f5f5f5}}
p>em:only-child{{color:#444}}</style></head><body>
{body}</body></html>"""


def fmt(value, missing: str = NOT_RECORDED) -> str:
    """One table cell: integers with thousands separators, floats to 4 significant digits, a missing value as
    `missing` (a word saying why, never a bare dash)."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return missing
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if abs(value) >= 1e7:
            return f"{value:.3g}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    text = str(value)
    return (text or missing).replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def escape(text: str) -> str:
    """Text from the analysis made safe for Markdown prose (its asterisks, as in R_D*, are not emphasis)."""
    return str(text).replace("*", "\\*")


def md_table(frame: pd.DataFrame, missing: str | dict[str, str] = NOT_RECORDED) -> str:
    """A frame as a Markdown table; `missing`: the text for an absent value, one for all columns or per column."""
    def absent(column) -> str:
        return missing.get(column, NOT_RECORDED) if isinstance(missing, dict) else missing

    head = "| " + " | ".join(fmt(str(c)) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(fmt(v, absent(c)) for c, v in zip(frame.columns, row)) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def slug(text: str) -> str:
    """A file-name part: lower case letters, digits and dashes."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in out.split("-") if part)


class Report:
    """Markdown lines of one report; tables go to `out`/tables/<name>.csv, figures are drawn to `out`/figures/."""

    def __init__(self, out: Path):
        self.out = out
        self.lines: list[str] = []
        for sub in ("tables", "figures"):
            (out / sub).mkdir(parents=True, exist_ok=True)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def add(self, *lines: str) -> None:
        self.lines += [*lines, ""]

    def table(self, frame: pd.DataFrame, name: str, shown: pd.DataFrame | None = None,
              missing: str | dict[str, str] = NOT_RECORDED) -> None:
        """Write the full frame to tables/<name>.csv and show `shown` (default: the frame) in the report."""
        frame.to_csv(self.out / "tables" / f"{name}.csv", index=False)
        self.add(md_table(frame if shown is None else shown, missing), "", f"(table: `tables/{name}.csv`)")

    def figure(self, path: Path | None, alt: str, caption: str, heading: str = "") -> bool:
        """An image with its one-line caption (what to look at) under it, under `heading` when given; nothing when
        the figure was not drawn (`path` None). True when it was added."""
        if path is None:
            return False
        self.add(*([heading] if heading else []), f"![{alt}](figures/{path.name})", f"*{caption}*")
        return True

    def write(self, title: str) -> Path:
        """report.md and report.html (tables wrapped in a box that scrolls on its own); returns report.md."""
        text = "\n".join(self.lines) + "\n"
        (self.out / "report.md").write_text(text, encoding="utf-8")
        body = markdown.markdown(text, extensions=["tables", "fenced_code"])
        body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
        (self.out / "report.html").write_text(HTML_PAGE.format(title=title, body=body), encoding="utf-8")
        return self.out / "report.md"
