"""The report's page skeleton and HTML tables: inline CSS, no script, no external resource."""

from __future__ import annotations

import html
import re
from typing import Any, Callable, Sequence

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1360px;
        padding: 0 16px; color: #1d2430; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 12px; }}
h2 {{ font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #d8dee8; padding-bottom: 4px; }}
h3 {{ font-size: 15px; margin: 16px 0 6px; }}
.note {{ color: #5a6475; font-size: 12.5px; font-weight: normal; }}
code, pre {{ font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f3f5f8; border-radius: 3px; }}
code {{ padding: 1px 4px; }}
pre {{ padding: 8px; white-space: pre-wrap; }}
img {{ max-width: 100%; display: block; margin: 8px 0; }}
table {{ border-collapse: collapse; margin: 6px 0 12px; font-size: 12.5px; }}
th, td {{ border: 1px solid #d8dee8; padding: 3px 8px; text-align: right; vertical-align: top; }}
th {{ background: #f3f5f8; text-align: left; }}
td:first-child, th:first-child {{ text-align: left; }}
td.t {{ text-align: left; }}
td.pre {{ text-align: left; white-space: pre-wrap; font: 11.5px ui-monospace, monospace; max-width: 560px; }}
tr.regression td, tr.failed td {{ background: #fde8e8; }}
tr.improvement td {{ background: #e6f6e8; }}
tr.noisy td {{ background: #fff6dd; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }}
.card {{ border: 1px solid #d8dee8; border-radius: 6px; padding: 8px 12px; min-width: 130px; }}
.card .k {{ color: #5a6475; font-size: 12px; }}
.card .v {{ font-size: 15px; font-weight: 600; }}
.card.ok {{ background: #e6f6e8; }} .card.bad {{ background: #fde8e8; }} .card.warn {{ background: #fff6dd; }}
footer {{ margin-top: 32px; color: #5a6475; font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
<footer>generated {generated} by <code>bench report</code> · self-contained: no scripts, no network</footer>
</body></html>
"""


_WORD = re.compile(r"[A-Za-z]{3,}")


def _is_number(cell: Any) -> bool:
    """Numbers, ratios and "a / b" figures align right; anything with a word aligns left."""
    text = "" if cell is None else str(cell)
    return not _WORD.search(text) and (text in ("", "—") or text.lstrip("+-×")[:1].isdigit())


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]],
               row_class: Callable[[Sequence[Any]], str] | None = None, pre_last: bool = False) -> str:
    """An escaped HTML table; `row_class` names a CSS class per row; `pre_last` keeps the last
    column's line breaks (error messages)."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cls = f' class="{html.escape(row_class(row))}"' if row_class else ""
        cells = [f"<td{'' if _is_number(c) else ' class=t'}>{html.escape('' if c is None else str(c))}</td>"
                 for c in row]
        if pre_last:
            cells[-1] = "<td class=pre>" + cells[-1].split(">", 1)[1]
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(title: str, note: str, figure: str, table: str) -> str:
    img = f'<img alt="{html.escape(title)}" src="{figure}">' if figure else ""
    sub = f"<p class=note>{html.escape(note)}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{sub}{img}{table}</section>"
