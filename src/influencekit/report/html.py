"""A static HTML page from headings, paragraphs, tables and images (no JavaScript, no external files).

Every text is escaped; images are referenced by relative path so the folder can be moved or zipped.
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["heading", "paragraph", "table", "image", "items", "page"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fdecea; } tr.good td { background: #eaf6ec; }
.note { color: #555; font-size: 0.9em; } img { max-width: 100%; }
"""


def _cell(value: Any) -> tuple[str, bool]:
    """The escaped text of a cell and whether it is a number (right-aligned)."""
    if isinstance(value, bool) or value is None:
        return _html.escape("" if value is None else str(value)), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value), True
        return (f"{value:.4g}" if (value == 0 or 1e-3 <= abs(value) < 1e5) else f"{value:.3e}"), True
    return _html.escape(str(value)), False


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{_html.escape(text)}</h{level}>"


def paragraph(text: str, *, note: bool = False) -> str:
    css = ' class="note"' if note else ""
    return f"<p{css}>{_html.escape(text)}</p>"


def items(texts: Iterable[str]) -> str:
    """A bulleted list."""
    return "<ul>" + "".join(f"<li>{_html.escape(t)}</li>" for t in texts) + "</ul>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; numbers are right-aligned and printed with 4 significant digits.

    ``row_classes`` gives a CSS class per row (``"bad"``: red background, ``"good"``: green, ``""``: none).
    """
    out = ["<table><thead><tr>" + "".join(f"<th>{_html.escape(str(h))}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        css = row_classes[i] if row_classes is not None and i < len(row_classes) else ""
        cells = []
        for value in row:
            text, numeric = _cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append((f'<tr class="{css}">' if css else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def image(src: str, alt: str) -> str:
    """An image by relative path."""
    return f'<p><img src="{_html.escape(src, quote=True)}" alt="{_html.escape(alt, quote=True)}"></p>'


def page(title: str, parts: Iterable[str]) -> str:
    """A complete HTML document with ``title`` as its heading and the given parts in order."""
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>{_html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
