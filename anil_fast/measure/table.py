"""The one table formatter of every report: Markdown for the .md files (compare, reproduce,
bench, the GPU acceptance) and aligned text for the console (the speed suites, the GPU check).
Numbers read with `digits` significant digits; a missing value reads "n/a"."""
from __future__ import annotations

__all__ = ["cell", "markdown_table", "text_table"]


def cell(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _columns(columns):
    """(key, label) pairs from keys or (key, label) pairs."""
    return [c if isinstance(c, tuple) else (c, c) for c in columns]


def markdown_table(rows: list[dict], columns, digits: int = 3, format_cell=None) -> list[str]:
    """The lines of a Markdown table of `rows` (dicts) over `columns`: keys, or (key, label)
    pairs. `format_cell(row, key)`: a column's own rendering, returning None for the default."""
    columns = _columns(columns)

    def text(row, key):
        custom = format_cell(row, key) if format_cell else None
        return custom if custom is not None else cell(row.get(key), digits)
    return (["| " + " | ".join(label for _, label in columns) + " |",
             "|" + " --- |" * len(columns)]
            + ["| " + " | ".join(text(r, k) for k, _ in columns) + " |" for r in rows])


def text_table(rows: list[dict], columns, title: str = "", digits: int = 3) -> str:
    """An aligned plain-text table (for the console)."""
    columns = _columns(columns)
    cells = [[cell(r.get(k), digits) for k, _ in columns] for r in rows]
    widths = [max(len(label), *(len(c[i]) for c in cells)) if cells else len(label)
              for i, (_, label) in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(label.ljust(w) for (_, label), w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
