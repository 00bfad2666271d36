"""The report's HTML, rendered from the Jinja2 templates in `templates/`.

Run ids, errors, host names and config labels come from result rows, which anything that can write a
row controls, so every value a template prints is escaped; what a template renders is `Markup`, so
fragments nest into sections and the page without being escaped twice. Nothing else is marked safe.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jinja2
from markupsafe import Markup

_WORD = re.compile(r"[A-Za-z]{3,}")


def _is_number(cell: Any) -> bool:
    """Numbers, ratios and "a / b" figures align right; anything with a word aligns left."""
    text = "" if cell is None else str(cell)
    return not _WORD.search(text) and (text in ("", "—") or text.lstrip("+-×")[:1].isdigit())


def _escape(value: Any) -> Markup:
    """Every printed value through `html.escape`: the entities (`&#x27;`) the report has always had,
    which readers grep for; markupsafe would write `&#39;`. Rendered fragments pass as they are."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


ENV = jinja2.Environment(loader=jinja2.PackageLoader("orchestrator.report", "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, finalize=_escape, trim_blocks=True, lstrip_blocks=True)
ENV.tests["numeric"] = _is_number


@dataclass(frozen=True)
class Column:
    """A table column; `pre` cells keep their line breaks in monospace (error messages)."""

    header: str
    pre: bool = False


def render(template: str, **context: Any) -> Markup:
    """`template` (a file in templates/) rendered with `context`."""
    return Markup(ENV.get_template(template).render(**context))


def table(columns: Sequence[str | Column], rows: Sequence[Sequence[Any]],
          row_class: Callable[[Sequence[Any]], str] | None = None, empty: str = "") -> Markup:
    """A table of `rows` under `columns` (a plain string is a plain column); `row_class` names a CSS
    class per row; `empty` is what stands in for a table without rows."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    return render("table.html.j2", columns=cols, rows=[(row_class(r) if row_class else "", r) for r in rows],
                  empty=empty)


def section(title: str, note: str = "", figure: str = "", content: Markup | str = "", level: int = 2) -> Markup:
    """A section under an `<h{level}>` heading; `figure` is a PNG data URI, `content` rendered HTML."""
    return render("section.html.j2", title=title, note=note, figure=figure, content=content, level=level)
