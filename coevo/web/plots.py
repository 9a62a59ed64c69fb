"""The papers' figures as inline SVG, drawn with matplotlib (no JavaScript, no CDN): pages and
the self-contained HTML report embed the returned `<svg>` text directly.

Each function takes plain rows (from `archive_store.pages`) and returns SVG markup, or None
when there is nothing to draw yet.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STYLE: dict[str, Any] = {
    "svg.fonttype": "none",  # text stays text: smaller, selectable, styled by the page's font
    "svg.hashsalt": "coevo",  # stable element ids: the same data draws the same SVG
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# Outcome colours: ok green, everything that is not a score shades of red and grey.
OUTCOME_COLOURS = {
    "ok": "#2e7d32", "rejected_by_policy": "#8e24aa", "duplicate": "#9e9e9e", "timeout": "#ef6c00",
    "error": "#c62828", "invalid_output": "#ad1457", "memory": "#6d4c41", "not_run": "#cfd8dc",
}
MAX_DOTS = 300  # dots drawn per iteration in the dev-score figure
VERDICT_COLOURS = {"approve": "#2e7d32", "reject": "#c62828", "quarantine": "#424242"}


# rcParams are process-wide and pages are drawn on the server's worker threads: one at a time.
_LOCK = threading.Lock()


@contextmanager
def _figure(width: float = 6.4, height: float = 3.0) -> Iterator[Figure]:
    with _LOCK, matplotlib.rc_context(cast(Any, STYLE)):
        yield Figure(figsize=(width, height), layout="constrained")  # no pyplot: nothing global to close


def _svg(fig: Figure, label: str, *, inline: bool = True) -> str:
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})  # the same data draws the same file
    text = out.getvalue()
    if not inline:  # a file of its own: keep its size; a white background for dark viewers
        return text.replace("<svg ", '<svg style="background: white" ', 1)
    text = text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE
    # Scale with the page; say what it shows for screen readers and tests.
    text = re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"', r'<svg \1', text, count=1)
    return text.replace("<svg ", f'<svg role="img" aria-label="{label}" class="plot" ', 1)


def dev_score_distribution(scores: Mapping[int, Sequence[float]]) -> str | None:
    """Self-Developing's iteration figure: dev scores of the executable programs, per iteration
    (box + every program as a dot)."""
    if not any(scores.values()):
        return None
    iterations = sorted(scores)
    with _figure() as fig:
        ax = fig.add_subplot()
        data = [100 * np.asarray(scores[i]) for i in iterations]
        ax.boxplot(data, positions=iterations, widths=0.5, showfliers=False,
                   medianprops={"color": "#1565c0"})
        rng = np.random.default_rng(0)
        for i, values in zip(iterations, data, strict=True):
            if len(values) > MAX_DOTS:  # the box covers all of them; the dots are a sample (the SVG stays small)
                values = rng.choice(values, MAX_DOTS, replace=False)
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=8, alpha=0.5, color="#37474f")
        ax.set_xlabel("iteration")
        ax.set_ylabel("dev score of executable programs (%)")
        ax.set_xticks(iterations)
        return _svg(fig, "dev-score distribution per iteration")


def outcomes(by_iteration: Mapping[int, Mapping[str, int]], reviews: Mapping[int, Mapping[str, int]]) -> str | None:
    """Per iteration: how programs ended (stacked bars), the executable rate, and human verdicts."""
    if not by_iteration:
        return None
    iterations = sorted(by_iteration)
    kinds = sorted({k for row in by_iteration.values() for k in row}, key=lambda k: (k != "ok", k))
    with _figure(6.4, 3.6) as fig:
        ax = fig.add_subplot()
        bottom = np.zeros(len(iterations))
        for kind in kinds:
            values = np.array([by_iteration[i].get(kind, 0) for i in iterations], dtype=float)
            ax.bar(iterations, values, bottom=bottom, width=0.6, label=kind, color=OUTCOME_COLOURS.get(kind, "#78909c"))
            bottom += values
        for i in iterations:
            verdicts = reviews.get(i, {})
            if verdicts:
                text = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
                ax.annotate(text, (i, bottom[iterations.index(i)]), ha="center", va="bottom", fontsize=7)
        ax.set_xlabel("iteration")
        ax.set_ylabel("programs")
        ax.set_xticks(iterations)
        rate = ax.twinx()
        rate.plot(iterations, [100 * by_iteration[i].get("ok", 0) / max(1, sum(by_iteration[i].values()))
                               for i in iterations], color="black", marker="o", label="executable rate")
        rate.set_ylim(0, 105)
        rate.set_ylabel("executable (%)")
        rate.grid(False)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=4, frameon=False)
        return _svg(fig, "program outcomes and executable rate per iteration")


def leaderboard(rows: Sequence[tuple[Any, ...]], top: int = 12) -> str | None:
    """Dev and test scores of the best merged models against the base, experts and reference merges."""
    rows = [r for r in rows if r[2] is not None][:top]
    if not rows:
        return None
    # A generated model is named by its algorithm id: the session prefix says nothing here.
    names = [str(r[0]).split("/", 1)[-1][-40:] for r in rows][::-1]
    dev = [100 * float(r[2]) for r in rows][::-1]
    test = [100 * float(r[3]) if r[3] is not None else 0.0 for r in rows][::-1]
    kinds = [str(r[1]) for r in rows][::-1]
    y = np.arange(len(rows))
    with _figure(6.4, 0.8 + 0.28 * len(rows)) as fig:
        ax = fig.add_subplot()
        ax.barh(y + 0.2, dev, height=0.4, label="dev", color=["#1565c0" if k == "merged" else "#90a4ae" for k in kinds])
        ax.barh(y - 0.2, test, height=0.4, label="test", color=["#ef6c00" if k == "merged" else "#cfd8dc" for k in kinds])
        ax.set_yticks(y, names, fontsize=7)
        ax.set_xlabel("exact match (%)  — blue/orange: generated merges, grey: baselines")
        ax.legend(fontsize=7, loc="lower right")
        return _svg(fig, "leaderboard against the baselines")


def dpo_history(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Each DPO update: final loss, and the mean dev score before and after it."""
    if not rows:
        return None
    iterations = [int(r["iteration"]) for r in rows]
    with _figure(6.4, 2.8) as fig:
        loss, dev = fig.subplots(1, 2)
        loss.plot(iterations, [r["final_loss"] if r["final_loss"] is not None else np.nan for r in rows], marker="o")
        loss.set_title("final DPO loss", fontsize=9)
        loss.set_xlabel("after iteration")
        before = [100 * r["mean_dev_before"] if r["mean_dev_before"] is not None else np.nan for r in rows]
        after = [100 * r["mean_dev_after"] if r["mean_dev_after"] is not None else np.nan for r in rows]
        dev.plot(iterations, before, marker="o", label="version trained from")
        dev.plot(iterations, after, marker="s", label="version produced")
        dev.set_title("mean dev score of its programs (%)", fontsize=9)
        dev.set_xlabel("after iteration")
        dev.legend(fontsize=7)
        for ax in (loss, dev):
            ax.set_xticks(iterations)
        return _svg(fig, "DPO history")


def coverage(metrics: Sequence[Mapping[str, Any]]) -> str | None:
    """Population modes: coverage of the archive, of the greedy team and best-of-N, per generation."""
    if not metrics:
        return None
    generations = [int(m["generation"]) for m in metrics]
    with _figure() as fig:
        ax = fig.add_subplot()
        for key, label in (("population_coverage", "archive"), ("team_coverage", "greedy team"),
                           ("best_of_n", "team, judge picks one answer")):
            ax.plot(generations, [100 * float(m[key]) for m in metrics], marker="o", label=label)
        ax.set_xlabel("generation")
        ax.set_ylabel("active tasks solved (%)")
        ax.set_ylim(0, 105)
        ax.set_xticks(generations)
        ax.legend(fontsize=7)
        return _svg(fig, "coverage per generation")


def team_curve(curve: Sequence[float], generation: int) -> str | None:
    """The greedy team's coverage for N = 1, 2, ... members (last generation)."""
    if not curve:
        return None
    with _figure(4.8, 2.6) as fig:
        ax = fig.add_subplot()
        n = np.arange(1, len(curve) + 1)
        ax.plot(n, [100 * float(v) for v in curve], marker="o", color="#2e7d32")
        ax.set_xlabel(f"team size N (generation {generation})")
        ax.set_ylabel("coverage (%)")
        ax.set_ylim(0, 105)
        ax.set_xticks(n)
        return _svg(fig, "greedy team coverage curve")


def elite_grid(grid: str, cells: Sequence[Mapping[str, Any]]) -> str | None:
    """A CycleQD MAP-Elites grid as a heatmap of quality (cells keyed 'i,j' by their bins)."""
    points = []
    for cell in cells:
        bins = [int(b) for b in str(cell["slot"]).split(",") if b.strip().lstrip("-").isdigit()]
        if bins:
            points.append((bins + [0])[:2] + [cell["fitness"]])
    if not points:
        return None
    rows = max(p[0] for p in points) + 1
    cols = max(p[1] for p in points) + 1
    values = np.full((rows, cols), np.nan)
    for i, j, fitness in points:
        values[i, j] = np.nan if fitness is None else 100 * float(fitness)
    with _figure(4.2, 3.4) as fig:
        ax = fig.add_subplot()
        ax.grid(False)
        image = ax.imshow(values, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
        fig.colorbar(image, ax=ax, label="quality (%)")
        ax.set_title(f"grid: {grid}", fontsize=9)
        ax.set_xlabel("behaviour bin 2")
        ax.set_ylabel("behaviour bin 1")
        return _svg(fig, f"MAP-Elites grid {grid}")


def generation_lines(title: str, series: Mapping[str, Sequence[float]], ylabel: str, *, first: int = 0) -> str:
    """One line per series over generations `first`, `first + 1`, ... (values in [0, 1], shown
    in %), as a standalone SVG file's text (bench/coevolution_experiments.py)."""
    with _figure(6.4, 3.4) as fig:
        ax = fig.add_subplot()
        for name, values in series.items():
            ax.plot(range(first, first + len(values)), [100 * float(v) for v in values], marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generation")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _svg(fig, title, inline=False)
