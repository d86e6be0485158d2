"""Learning curves and a results table from the tensorboard logs of several runs, grouped by method.

Each group is `label=glob` (the run folders of one method, one per seed). For the chosen scalar it prints
a markdown table (per group: the value at the last step of each seed, their mean, standard deviation,
min and max, and the best value each seed reached) and writes an SVG picture: one panel per group, the mean
over seeds against the step with a band from the lowest to the highest seed, the first group's mean repeated in
every later panel as the reference. No plotting library is needed (a figure is text that diffs in git, and the
tests draw it).

    python benchmark/curves.py --groups "Guided-OPD=runs/guided/*" "vanilla OPD=runs/vanilla/*" \\
        --tag eval/success_rate --out runs/guided_opd.svg
"""

from __future__ import annotations

import glob
import math
import os
import statistics
from dataclasses import dataclass, field
from html import escape

import tyro

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


@dataclass
class Args:
    groups: list[str] = field(default_factory=list)
    """`label=glob` per method, e.g. "Guided-OPD=runs/guided/*" (one run folder per seed)"""
    tag: str = "eval/success_rate"
    """the tensorboard scalar to compare"""
    out: str | None = None
    """write the SVG picture here (none: only the table)"""
    title: str = ""
    """title of the picture"""
    ylabel: str = ""
    """label of the y axis (default: the tag)"""


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """Every scalar of a run: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_scalar(run_dir: str, tag: str) -> dict[int, float]:
    scalars = read_scalars(run_dir)
    if tag not in scalars:
        raise SystemExit(f"error: {run_dir} has no scalar {tag!r}; it has {', '.join(sorted(scalars))}")
    return scalars[tag]


def load_groups(specs: list[str], tag: str) -> dict[str, list[dict[int, float]]]:
    groups = {}
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        runs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if not sep or not runs:
            raise SystemExit(f"error: group {spec!r} names no run folders: write it as label=glob, e.g. 'guided=runs/g*'")
        groups[label] = [read_scalar(d, tag) for d in runs]
    return groups


def summary(curves: list[dict[int, float]]) -> dict:
    finals = [c[max(c)] for c in curves]
    return {"finals": finals, "mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "min": min(finals), "max": max(finals), "best": [max(c.values()) for c in curves]}


def table(groups: dict[str, list[dict[int, float]]], tag: str) -> str:
    rows = [f"| method | seeds | final {tag}: mean ± std | min-max | per seed | best per seed |", "|---|---|---|---|---|---|"]
    for label, curves in groups.items():
        s = summary(curves)
        rows.append(f"| {label} | {len(curves)} | {s['mean']:.2f} ± {s['std']:.2f} | {s['min']:.2f}-{s['max']:.2f} | "
                    + ", ".join(f"{v:.2f}" for v in s["finals"]) + " | " + ", ".join(f"{v:.2f}" for v in s["best"]) + " |")
    return "\n".join(rows)


def nice_step(span: float, most: int = 6) -> float:
    """The tick spacing for an axis of length span: 1, 2 or 5 times a power of ten, at most `most` ticks."""
    step = 10 ** math.floor(math.log10(span / most)) if span > 0 else 1
    return next(m * step for m in (1, 2, 5, 10) if span / (m * step) <= most)


def svg(groups: dict[str, list[dict[int, float]]], title: str, ylabel: str, reference: str = "teacher") -> str:
    """One panel per group (small multiples, 1-3 columns): its mean over seeds (line) and min-max over seeds (band) at
    the steps every seed logged; the first group's mean, dashed grey, in every later panel, so each arm is read
    against the first; the `reference` group (the teacher), if any, as a dotted level in every panel."""
    def points(curves):
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        return [(s, statistics.mean(c[s] for c in curves), min(c[s] for c in curves), max(c[s] for c in curves))
                for s in steps]

    series = {label: points(curves) for label, curves in groups.items() if label != reference}
    level = statistics.mean(c[min(c)] for c in groups[reference]) if reference in groups else None
    everything = [p for pts in series.values() for p in pts]
    xmax = max(p[0] for p in everything) or 1
    lo = min(0.0, min(p[2] for p in everything))
    hi = max(1.0, max(p[3] for p in everything), level or 0.0)
    cols = 1 if len(series) == 1 else 2 if len(series) <= 4 else 3
    rows = math.ceil(len(series) / cols)
    pw, ph, left, gap, bottom, top, head = 300, 190, 46, 40, 34, 24, 62  # a panel, its margins, the figure's heading
    W, H = cols * (pw + left + gap) + 10, head + rows * (ph + top + bottom)
    first = next(iter(series))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="10" y="20" font-size="14">{escape(title)}</text>',
           f'<text x="10" y="38" fill="#555">{escape(ylabel)} against the iteration: each panel one arm, its mean over '
           f'seeds (line) and min-max (band);</text>',
           f'<text x="10" y="52" fill="#555">grey dashed: {escape(first)}' + (", dotted: the teacher" if level is not None
                                                                               else "") + '</text>']
    xstep, ystep = nice_step(xmax), nice_step(hi - lo, 5)
    for i, (label, pts) in enumerate(series.items()):
        x0, y0 = 10 + left + (i % cols) * (pw + left + gap), head + (i // cols) * (ph + top + bottom) + top

        def x(v):
            return x0 + pw * v / xmax

        def y(v):
            return y0 + ph * (1 - (v - lo) / (hi - lo))

        c = COLOURS[i % len(COLOURS)]
        out.append(f'<text x="{x0}" y="{y0 - 8}">{escape(label)} ({len(groups[label])} seeds)</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
        for k in range(int(round((hi - lo) / ystep)) + 1):  # grid and y ticks
            v = lo + k * ystep
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{x0 - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        for k in range(int(xmax // xstep) + 1):  # x ticks
            out.append(f'<text x="{x(k * xstep):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{k * xstep:g}</text>')
        if level is not None:
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y(level):.1f}" y2="{y(level):.1f}" stroke="#000" '
                       f'stroke-dasharray="2,3"/>')
        if label != first:
            out.append(f'<polyline points="{" ".join(f"{x(s):.1f},{y(m):.1f}" for s, m, _, _ in series[first])}" '
                       f'fill="none" stroke="#999" stroke-width="1.5" stroke-dasharray="5,4"/>')
        band = [f"{x(s):.1f},{y(mx):.1f}" for s, _, _, mx in pts] + [f"{x(s):.1f},{y(mn):.1f}" for s, _, mn, _ in reversed(pts)]
        out.append(f'<polygon points="{" ".join(band)}" fill="{c}" fill-opacity="0.2" stroke="none"/>')
        out.append(f'<polyline points="{" ".join(f"{x(s):.1f},{y(m):.1f}" for s, m, _, _ in pts)}" fill="none" '
                   f'stroke="{c}" stroke-width="2"/>')
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.groups:
        raise SystemExit("error: pass --groups label=glob [label=glob ...]")
    groups = load_groups(args.groups, args.tag)
    print(table(groups, args.tag))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(svg(groups, args.title, args.ylabel or args.tag))
        print(f"wrote {args.out}")
