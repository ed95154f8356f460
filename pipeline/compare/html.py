"""``report.html``: the comparison report as one self-contained page, for the MLflow UI's artifact viewer (which shows
an HTML file as a page but a markdown file as plain text, ``<u>`` and image links included).

It renders the markdown that :mod:`pipeline.compare.report` writes — headings, paragraphs, ``**bold**``,
`` `code` ``, ``<u>`` marks, ``- `` lists, pipe tables and ``![caption](file.png)`` images — and inlines every image
as a data URI, so the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
         "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")


def inline(text: str) -> str:
    """One line of markdown text as HTML: escaped, then ``**bold**``, `` `code` `` and ``<u>…</u>``."""
    out = html.escape(text, quote=False)
    out = re.sub(r"&lt;u&gt;(.*?)&lt;/u&gt;", r"<u>\1</u>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def render(markdown: str, folder: Path) -> str:
    """The HTML page of ``markdown``; images are read from ``folder`` (a missing one is named, not inlined)."""
    body: list[str] = []
    blocks = re.split(r"\n\s*\n", markdown.strip())
    for block in blocks:
        lines = block.splitlines()
        first = lines[0]
        if first.startswith("#"):
            level = len(first) - len(first.lstrip("#"))
            body.append(f"<h{level}>{inline(first[level:].strip())}</h{level}>")
            lines = lines[1:]
            if not lines:
                continue
            first = lines[0]
        image = _IMAGE.match(first.strip())
        if first.startswith("|") and len(lines) > 1 and set(lines[1].replace("|", "").strip()) <= set("-: "):
            head = "".join(f"<th>{inline(c)}</th>" for c in _cells(first))
            rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in lines[2:])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif image:
            caption, name = image.groups()
            path = folder / name
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{inline(caption)}</figcaption></figure>")
            else:
                body.append(f"<p>(figure {html.escape(name)} is missing)</p>")
        elif all(line.startswith("- ") for line in lines):
            body.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            body.append(f"<p>{inline(' '.join(lines))}</p>")
    title = inline(markdown.lstrip("# ").splitlines()[0]) if markdown.strip() else "report"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
