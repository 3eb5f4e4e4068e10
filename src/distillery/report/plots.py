"""The report's pictures: matplotlib (Agg backend) figures returned as ``data:image/png;base64`` URIs.

Each function takes the plain data from :mod:`distillery.report.collect` and returns a URI, or None
when there is nothing to draw (the page then says so instead of showing an empty frame).
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def to_uri(fig) -> str:
    """PNG bytes of ``fig`` as a data URI (the page carries its images inside itself)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _x(records: list[dict]) -> tuple[list, str]:
    """Training tokens if every record has them, else steps."""
    if records and all(r.get("tokens_seen") is not None for r in records):
        return [r["tokens_seen"] for r in records], "training tokens (targets)"
    return [r["step"] for r in records], "step"


def curves(runs: list[dict]) -> str | None:
    """Three panels: training loss, validation KL(teacher‖student), validation top-1 agreement."""
    if not any(r["train"] or r["val"] for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    xlabel = "step"
    for i, run in enumerate(runs):
        color, label = COLORS[i % len(COLORS)], f"{run['name']} ({run['objective']})"
        if run["train"]:
            x, xlabel = _x(run["train"])
            axes[0].plot(x, [r["loss"] for r in run["train"]], color=color, lw=1.2, label=label)
        val = [r for r in run["val"] if r.get("kl_teacher_student") is not None]
        if val:
            x, _ = _x(val)
            style = dict(color=color, marker="o", ms=4, lw=1.5, label=label)
            axes[1].plot(x, [r["kl_teacher_student"] for r in val], **style)
            axes[2].plot(x, [r["top1_agreement"] for r in val], **style)
    titles = ("training loss (each run's own objective)", "validation KL(teacher ‖ student), nats/token",
              "validation top-1 agreement with the teacher")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=9,
               bbox_to_anchor=(0.5, -0.08), frameon=False)
    return to_uri(fig)


def scatter(points: list[dict]) -> str | None:
    """Quality vs size and vs speed across students (and the teacher).

    ``points``: dicts with ``name``, ``kl`` (held-out KL to the teacher, lower is better), ``parameters``,
    ``speed`` (tok/s or None), ``speed_label``, ``teacher`` (bool) and ``color`` (the run's index, so a
    student has the same colour as its curves).
    """
    pts = [p for p in points if p.get("kl") is not None and p.get("parameters")]
    if not pts:
        return None
    speed_pts = [p for p in pts if p.get("speed")]
    fig, axes = plt.subplots(1, 2 if speed_pts else 1, figsize=(12 if speed_pts else 6.5, 4.2), squeeze=False)
    panels = [("parameters", "parameters (log scale)", pts)]
    if speed_pts:
        panels.append(("speed", speed_pts[0].get("speed_label") or "tok/s", speed_pts))
    for ax, (key, xlabel, group) in zip(axes[0], panels):
        for i, p in enumerate(group):
            marker, color = ("*", "black") if p.get("teacher") else ("o", COLORS[p.get("color", i) % len(COLORS)])
            ax.scatter(p[key], p["kl"], s=140 if p.get("teacher") else 60, marker=marker, color=color, zorder=3)
            ax.annotate(p["name"], (p[key], p["kl"]), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ax.set_xscale("log")
        label = (lambda v: f"{v / 1e6:g}M") if key == "parameters" else (lambda v: f"{v:g}")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, f=label: f(v)))
        # log axes spanning under a decade show only minor ticks: label 1, 2, 3, 5 x 10^k so they do not collide
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _, f=label: f(v) if f"{v:.0e}"[0] in "1235" else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out KL(teacher ‖ student) ↓")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_title("quality vs size", fontsize=10)
    if speed_pts:
        axes[0][1].set_title("quality vs speed", fontsize=10)
    return to_uri(fig)
