"""How fmnist's objects look in a notebook: small HTML pieces for ``_repr_html_`` methods.

Plain HTML with inline styles and no scripts, so a saved notebook shows the same on GitHub
as in Jupyter; images are PNG data URIs or inline SVG.
"""

from __future__ import annotations

import base64
import html
import math

_BOX = "font-family:system-ui,sans-serif;font-size:13px;line-height:1.35"
_CELL = "padding:1px 10px 1px 0;text-align:left;vertical-align:top"


def escape(value) -> str:
    return html.escape(str(value))


def short_path(path) -> str:
    """A path with the home folder written as ~ (a shared notebook need not show whose it was)."""
    import os

    text, home = str(path), os.path.expanduser("~")
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + os.sep) else text


def card(title: str, rows: list[tuple[str, str]], extra: str = "") -> str:
    """A title, a two-column table (names, already-escaped HTML values) and extra HTML."""
    body = "".join(f"<tr><th style='{_CELL};font-weight:600;color:#555'>{escape(name)}</th>"
                   f"<td style='{_CELL}'>{value}</td></tr>" for name, value in rows)
    return (f"<div style='{_BOX}'><div style='font-weight:600;margin-bottom:3px'>{title}</div>"
            f"<table style='border-collapse:collapse'>{body}</table>{extra}</div>")


def png_img(png: bytes, alt: str, height: int | None = None) -> str:
    size = f" height='{height}'" if height else ""
    return (f"<img alt='{escape(alt)}'{size} style='image-rendering:pixelated' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>")


def sparkline(series: dict[str, list[float]], width: int = 220, height: int = 60,
              colours=("#1f77b4", "#ff7f0e")) -> str:
    """An inline SVG of a few series over epochs sharing one y-range (finite values only),
    with the range written beside it: a glance at a curve, not a figure."""
    values = [v for points in series.values() for v in points if v is not None and math.isfinite(v)]
    if not values or max(len(points) for points in series.values()) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    pad = 3
    lines, legend = [], []
    for (name, points), colour in zip(series.items(), colours):
        step = (width - 2 * pad) / max(1, len(points) - 1)
        xy = [f"{pad + i * step:.1f},{pad + (height - 2 * pad) * (high - v) / span:.1f}"
              for i, v in enumerate(points) if v is not None and math.isfinite(v)]
        lines.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.6' points='{' '.join(xy)}'/>")
        legend.append(f"<span style='color:{colour}'>&#9644; {escape(name)}</span>")
    svg = (f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
           f"style='background:#fafafa;border:1px solid #eee'>{''.join(lines)}</svg>")
    return (f"<div style='display:flex;gap:8px;align-items:center;margin-top:4px'>{svg}"
            f"<div style='font-size:11px;color:#555'>{' '.join(legend)}<br>{high:.4f} top, {low:.4f} bottom"
            f"</div></div>")
