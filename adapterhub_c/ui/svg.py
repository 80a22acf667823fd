"""Pictures drawn on the server as inline SVG: the lineage graph, Compare's scatter, line charts.

Every text that comes from the registry (names, roles) is HTML-escaped here; the functions
return ``markupsafe.Markup`` so templates insert them as they are.
"""
from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

BOX_W, BOX_H, COL_GAP, ROW_GAP, MAX_PER_COLUMN = 210, 34, 110, 14, 12
COLOURS = {"base": "#d7e3fc", "variant": "#fde2c5", "lora": "#d9f2d9", "recovered-lora": "#c8ebe0",
           "pack": "#efe0f7", "merged": "#fbd9e4", "composed": "#f8e7b5", "prompt": "#e3e3e3"}


def object_href(name: str) -> str:
    """The page of an object (names may hold ``/`` and ``:``)."""
    return "/object/" + quote(name, safe="")


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _columns(tree: dict[str, Any], depth: int) -> dict[int, list[dict]]:
    """Column index → nodes: the object at 0, ancestors at -1, -2, …, descendants at 1, 2, …;
    each node {name, type, edges: [(neighbour name, role)]} towards the centre."""
    root = {"name": tree["name"], "type": tree.get("kind") or tree["type"], "edges": []}
    cols: dict[int, dict[str, dict]] = {0: {tree["name"]: root}}

    def walk(items, col, key, step, centre_name):
        if abs(col) > depth:
            return
        for item in items:
            node = cols.setdefault(col, {}).setdefault(
                item["name"], {"name": item["name"], "type": item.get("kind") or item["type"], "edges": []})
            node["edges"].append((centre_name, item["role"]))
            walk(item.get(key) or [], col + step, key, step, item["name"])

    walk(tree.get("parents") or [], -1, "parents", -1, tree["name"])
    walk(tree.get("children") or [], 1, "children", 1, tree["name"])
    return {c: list(nodes.values()) for c, nodes in sorted(cols.items())}


def lineage_svg(tree: dict[str, Any], kinds: dict[str, str] | None = None, depth: int = 4) -> Markup:
    """The lineage of ``tree`` (``lineage_tree``'s dict) drawn both ways, left (parents) to right (children)."""
    kinds = kinds or {}
    cols = _columns(tree, depth)
    shown = {c: nodes[:MAX_PER_COLUMN] for c, nodes in cols.items()}
    first = min(shown)
    rows = max(len(n) + (1 if len(cols[c]) > MAX_PER_COLUMN else 0) for c, n in shown.items())
    width = len(shown) * (BOX_W + COL_GAP) - COL_GAP + 20
    height = rows * (BOX_H + ROW_GAP) + 20
    pos = {}
    for c, nodes in shown.items():
        x = 10 + (c - first) * (BOX_W + COL_GAP)
        top = 10 + (height - 20 - len(nodes) * (BOX_H + ROW_GAP)) / 2
        for i, n in enumerate(nodes):
            pos[(c, n["name"])] = (x, top + i * (BOX_H + ROW_GAP))
    parts = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">']
    parts += _edges(shown, pos)
    for (c, name), (x, y) in pos.items():
        node = next(n for n in shown[c] if n["name"] == name)
        parts.append(_box(node, x, y, kinds.get(name) or node["type"], centre=c == 0))
    for c, nodes in cols.items():
        if len(nodes) > MAX_PER_COLUMN:
            x = 10 + (c - first) * (BOX_W + COL_GAP)
            parts.append(f'<text x="{x + 4}" y="{height - 8}" class="more">+{len(nodes) - MAX_PER_COLUMN} more</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _edges(shown: dict[int, list[dict]], pos: dict) -> list[str]:
    out = []
    for c, nodes in shown.items():
        towards = c - 1 if c > 0 else c + 1
        for n in nodes:
            for other, role in n["edges"]:
                if (towards, other) not in pos or (c, n["name"]) not in pos:
                    continue
                a, b = pos[(c, n["name"])], pos[(towards, other)]
                left, right = (b, a) if c > 0 else (a, b)
                x1, y1, x2, y2 = left[0] + BOX_W, left[1] + BOX_H / 2, right[0], right[1] + BOX_H / 2
                out.append(f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{x1 + 50:.0f},{y1:.0f} {x2 - 50:.0f},{y2:.0f} '
                           f'{x2:.0f},{y2:.0f}" marker-end="url(#arrow)"/>')
                out.append(f'<text class="role" x="{(x1 + x2) / 2:.0f}" y="{(y1 + y2) / 2 - 4:.0f}" '
                           f'text-anchor="middle">{escape(role)}</text>')
    marker = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>')
    return [marker, *out]


def _box(node: dict, x: float, y: float, kind: str, centre: bool) -> str:
    fill = COLOURS.get(kind, "#eee")
    stroke = ' stroke-width="2.5" stroke="#223"' if centre else ' stroke="#889"'
    name = node["name"]
    return (f'<a href="{escape(object_href(name))}" class="node" data-name="{escape(name)}">'
            f'<title>{escape(name)} ({escape(kind)})</title>'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}"{stroke}/>'
            f'<text x="{x + 8:.0f}" y="{y + 14:.0f}" class="kind">{escape(kind)}</text>'
            f'<text x="{x + 8:.0f}" y="{y + 28:.0f}" class="name">{escape(_short(name))}</text></a>')


# ---- charts -------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g} M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.3g} k"
    return f"{v:.3g}"


class _Frame:
    """Maps data to pixels inside a plot area with margins; x optionally on a log scale."""

    def __init__(self, xs, ys, width=640, height=360, log_x=False):
        self.w, self.h, self.log_x = width, height, log_x
        self.left, self.right, self.top, self.bottom = 70, 20, 16, 46
        fx = [math.log10(x) for x in xs] if log_x else list(xs)
        self.x0, self.x1 = min(fx), max(fx)
        self.y0, self.y1 = min(ys), max(ys)
        if self.x1 == self.x0:
            pad = abs(self.x0) * 0.1 or 1
            self.x0, self.x1 = self.x0 - pad, self.x1 + pad
        if self.y1 == self.y0:
            pad = abs(self.y0) * 0.1 or 1
            self.y0, self.y1 = self.y0 - pad, self.y1 + pad

    def px(self, x):
        v = math.log10(x) if self.log_x else x
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y):
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def axes(self, xlabel: str, ylabel: str) -> list[str]:
        out = [f'<line class="axis" x1="{self.left}" y1="{self.h - self.bottom}" x2="{self.w - self.right}" '
               f'y2="{self.h - self.bottom}"/>',
               f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.h - self.bottom}"/>']
        for t in _ticks(self.x0, self.x1):
            value = 10 ** t if self.log_x else t
            x = self.px(value)
            out.append(f'<text class="tick" x="{x:.0f}" y="{self.h - self.bottom + 16}" text-anchor="middle">'
                       f'{_fmt(value)}</text>')
        for t in _ticks(self.y0, self.y1):
            out.append(f'<text class="tick" x="{self.left - 6}" y="{self.py(t) + 4:.0f}" text-anchor="end">'
                       f'{_fmt(t)}</text>')
        out.append(f'<text class="label" x="{(self.left + self.w - self.right) / 2:.0f}" y="{self.h - 8}" '
                   f'text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text class="label" transform="translate(14,{(self.top + self.h - self.bottom) / 2:.0f}) '
                   f'rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
        return out


def scatter_svg(scatter: dict[str, Any]) -> Markup:
    """Compare's scatter: stored size (x) against quality (y), references as dashed lines."""
    points, refs = scatter.get("points") or [], scatter.get("references") or []
    if not points and not refs:
        return Markup('<p class="muted">No artefact here has both a size and a quality figure.</p>')
    xs = [p["x"] for p in points] or [1, 10]
    ys = [p["y"] for p in points] + [r["y"] for r in refs]
    log_x = min(xs) > 0 and max(xs) / min(xs) > 20
    f = _Frame(xs, ys, log_x=log_x)
    parts = [f'<svg class="chart scatter" xmlns="http://www.w3.org/2000/svg" width="{f.w}" height="{f.h}" '
             f'viewBox="0 0 {f.w} {f.h}" role="img" aria-label="size against quality">']
    parts += f.axes("stored size (bytes" + (", log scale)" if log_x else ")"), scatter.get("column") or "")
    for i, r in enumerate(refs):  # labels alternate right / left, stacked when lines coincide
        y = f.py(r["y"])
        x, anchor = (f.w - f.right - 4, "end") if i % 2 == 0 else (f.left + 6, "start")
        parts.append(f'<line class="ref" x1="{f.left}" x2="{f.w - f.right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="reflabel" x="{x}" y="{y - 4 - 11 * (i // 2):.1f}" text-anchor="{anchor}">'
                     f'{escape(r["name"])} {_fmt(r["y"])}</text>')
    taken: dict[tuple[int, int], int] = {}
    for p in points:
        x, y = f.px(p["x"]), f.py(p["y"])
        k = taken[(round(x / 8), round(y / 8))] = taken.get((round(x / 8), round(y / 8)), -1) + 1
        parts.append(f'<g class="point" data-name="{escape(p["name"])}"><title>{escape(p["name"])}: '
                     f'{_fmt(p["x"])}B, {_fmt(p["y"])}</title><circle cx="{x:.1f}" cy="{y:.1f}" r="5"/>'
                     f'<text x="{x + 7:.1f}" y="{y - 6 + 12 * k:.1f}" class="plabel">{escape(_short(p["name"], 24))}'
                     '</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line_svg(curve: dict[str, Any]) -> Markup:
    """A small line chart of one numeric series {name, points: [[x, y], …]}."""
    pts = curve["points"]
    f = _Frame([p[0] for p in pts], [p[1] for p in pts], width=420, height=220)
    path = " ".join(f"{'M' if i == 0 else 'L'}{f.px(x):.1f},{f.py(y):.1f}" for i, (x, y) in enumerate(pts))
    parts = [f'<svg class="chart line" xmlns="http://www.w3.org/2000/svg" width="{f.w}" height="{f.h}" '
             f'viewBox="0 0 {f.w} {f.h}" role="img" aria-label="{escape(curve["name"])}">']
    parts += f.axes("step", curve["name"])
    parts.append(f'<path class="series" d="{path}"/></svg>')
    return Markup("".join(parts))
