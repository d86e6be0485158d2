"""Learning curves and a results table from the tensorboard logs of several runs, grouped by method.

Each group is `label=glob` (the run folders of one method, one per seed). For the chosen scalar it prints
a markdown table (per group: the value at the last step of each seed, their mean, standard deviation,
min and max, and the best value each seed reached) and writes an SVG picture: the mean over seeds
against the step, with a band from the lowest to the highest seed. No plotting library is needed.

    python benchmark/curves.py --groups "Guided-OPD=runs/guided/*" "vanilla OPD=runs/vanilla/*" \\
        --tag eval/success_rate --out benchmark/figures/guided_opd.svg
"""

from __future__ import annotations

import glob
import os
import statistics
from dataclasses import dataclass, field

import tyro

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


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


def svg(groups: dict[str, list[dict[int, float]]], title: str, ylabel: str) -> str:
    """Mean over seeds (line) and min-max over seeds (band) at the steps every seed logged."""
    W, H, left, right, top, bottom = 640, 360, 60, 170, 30, 45
    series = {}
    for label, curves in groups.items():
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        series[label] = [(s, statistics.mean(c[s] for c in curves), min(c[s] for c in curves), max(c[s] for c in curves))
                         for s in steps]
    xmax = max(max(p[0] for p in pts) for pts in series.values()) or 1
    lo = min(0.0, min(p[2] for pts in series.values() for p in pts))
    hi = max(1.0, max(p[3] for pts in series.values() for p in pts))

    def x(v):
        return left + (W - left - right) * v / xmax

    def y(v):
        return top + (H - top - bottom) * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">{title}</text>']
    for k in range(6):  # grid and y ticks
        v = lo + (hi - lo) * k / 5
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for k in range(6):  # x ticks
        v = xmax * k / 5
        out.append(f'<text x="{x(v):.1f}" y="{H - bottom + 16}" text-anchor="middle">{v:.0f}</text>')
    out.append(f'<text x="{(left + W - right) / 2}" y="{H - 8}" text-anchor="middle">iteration</text>')
    out.append(f'<text x="14" y="{(top + H - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + H - bottom) / 2})">{ylabel}</text>')
    for i, (label, pts) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        band = [f"{x(s):.1f},{y(mx):.1f}" for s, _, _, mx in pts] + [f"{x(s):.1f},{y(mn):.1f}" for s, _, mn, _ in reversed(pts)]
        out.append(f'<polygon points="{" ".join(band)}" fill="{c}" fill-opacity="0.15" stroke="none"/>')
        out.append(f'<polyline points="{" ".join(f"{x(s):.1f},{y(m):.1f}" for s, m, _, _ in pts)}" fill="none" '
                   f'stroke="{c}" stroke-width="2"/>')
        n = len(groups[label])
        out.append(f'<rect x="{W - right + 12}" y="{top + 20 * i}" width="14" height="4" fill="{c}"/>')
        out.append(f'<text x="{W - right + 32}" y="{top + 20 * i + 6}">{label} ({n} seeds)</text>')
    out.append(f'<text x="{W - right + 12}" y="{top + 20 * len(series) + 10}" fill="#555">line: mean;</text>')
    out.append(f'<text x="{W - right + 12}" y="{top + 20 * len(series) + 24}" fill="#555">band: min-max</text>')
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
