"""HTML pieces shared by the report's sections: escaping, number cells, plain tables."""

from __future__ import annotations

import html


def esc(x) -> str:
    return html.escape(str(x))


def num(x, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"
