"""``kernelrl analyze --plot``: the analysis as one PNG (matplotlib, Agg, no display).

Three panels: reward and compile/correct rates by turn index; by step, the groups' mean reward (``steps.jsonl``)
and the final correct rate of the trajectories each step sampled (one line of each per run); the speedup
distribution of correct final kernels (the summary's log-scale histogram). Invariant: drawn
from an ``Analysis`` only (no log is read here), on a ``matplotlib.figure.Figure`` of its own (no pyplot state),
so the figure returned is what the PNG shows. Imported only when a plot is asked for.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kernelrl.actors.analysis import Analysis


def plot(analysis: Analysis, path: Path | None = None) -> Figure:
    """The figure (saved as a PNG at ``path`` when given)."""
    s = analysis.combined
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_turn, by_step, speed = fig.subplots(1, 3)

    turns = [t.turn_idx for t in s.per_turn]
    by_turn.plot(turns, [t.reward_mean for t in s.per_turn], marker="o", label="reward (mean)")
    by_turn.plot(turns, [t.correct_rate for t in s.per_turn], marker="s", label="correct rate")
    by_turn.plot(turns, [t.compile_rate for t in s.per_turn], marker="^", linestyle="--", label="compile rate")
    by_turn.set(title="Reward and correctness by turn", xlabel="turn index", xticks=turns)
    by_turn.legend()

    several = len({st.run for st in s.steps} | {o.run for o in s.per_step}) > 1
    for run in dict.fromkeys(st.run for st in s.steps):
        rows = [st for st in s.steps if st.run == run]
        label = f"group reward_mean ({run})" if several else "group reward_mean"
        by_step.plot([st.step for st in rows], [st.reward_mean for st in rows], marker=".", label=label)
    for run in dict.fromkeys(o.run for o in s.per_step):
        outcomes = [o for o in s.per_step if o.run == run]
        label = f"final correct rate ({run})" if several else "final correct rate"
        rates = [o.final_correct_rate for o in outcomes]
        by_step.plot([o.step for o in outcomes], rates, marker="x", linestyle="--", label=label)
    by_step.set(title="Reward and correctness by step", xlabel="step")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    if s.steps or s.per_step:
        by_step.legend()

    hist = s.speedup_histogram
    edges = hist.edges
    speed.bar(
        edges[:-1],
        hist.counts,
        width=[b - a for a, b in itertools.pairwise(edges)],
        align="edge",
        edgecolor="black",
        linewidth=0.3,
    )
    speed.set_xscale("log", base=2)
    speed.axvline(1.0, color="grey", linestyle=":")
    speed.set_ylim(bottom=0)
    if not sum(hist.counts):
        speed.text(0.5, 0.5, "no correct kernel with a measured speedup", transform=speed.transAxes, ha="center")
    speed.set(title=f"Speedup of correct final kernels ({sum(hist.counts):,} timed)", xlabel="speedup (×)", ylabel="kernels")

    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
