"""One picture of an eval run: accuracy against peak KV memory, one labelled point per configuration.

matplotlib is optional (the ``demo`` and ``agent`` extras install it); it is imported only when a
plot is drawn, through its object API on the Agg canvas: no display, no global pyplot state.

Example
-------
>>> report = EvalReport.from_json(open("eval.json").read())   # doctest: +SKIP
>>> report.plot("eval.png")                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_report", "require_matplotlib", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = ('plotting an eval report needs matplotlib, which is not installed: '
                      'pip install "kvcompact[demo]" (or pip install matplotlib)')

# One marker and colour per replay mode, so the reference (dense) and the re-prefill baseline stand
# apart from the in-place configurations; a mode added later gets the fallback.
# mode -> (marker, colour, legend label, size, z-order)
_STYLE = {
    "dense": ("*", "black", "dense (reference)", 260, 3),
    "reprefill": ("D", "tab:red", "reprefill (full re-prefill)", 110, 4),
    "inplace": ("o", "tab:blue", "in-place edits", 45, 5),
    "budget": ("^", "tab:green", "token budget (eviction policy)", 55, 5),
}
_FALLBACK = ("v", "tab:purple", None, 55, 5)


def require_matplotlib() -> None:
    """Raise ImportError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err


def _model_label(model: str) -> str:
    # run_eval names the model by its name_or_path, often a long local folder: its last part is enough.
    name = Path(str(model).rstrip("/\\")).name
    return name or str(model)


def plot_report(report, path) -> Path:
    """Draw ``report`` (an :class:`~kvcompact.eval.report.EvalReport`) into the PNG file ``path``.

    x: peak KV memory (MiB, ``ConfigResult.peak_kv_bytes``); y: accuracy (%). Configurations at the
    same point share one label. Returns the path written.

    Raises
    ------
    ImportError
        matplotlib is not installed (the message names the extra).
    ValueError
        The report has no configuration.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not report.configs:
        raise ValueError("the report has no configuration to plot")
    path = Path(path)
    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    points: dict = {}  # (x, y) -> names, so coinciding configurations get one label
    seen_modes = set()
    for c in report.configs:
        x = c.peak_kv_bytes / 2**20
        y = 100.0 * c.accuracy if c.total else float("nan")
        mode = c.config.get("mode")
        marker, color, label, size, z = _STYLE.get(mode, _FALLBACK)
        # The reference and reprefill are drawn larger and below: a point on top of them leaves a rim.
        ax.scatter([x], [y], marker=marker, color=color, s=size, zorder=z, edgecolors="white", linewidths=0.5,
                   label=None if mode in seen_modes else (label or str(mode)))
        seen_modes.add(mode)
        if not math.isnan(y):
            points.setdefault((round(x, 3), round(y, 3)), []).append(c.name)

    # A label goes above its point, or below it when a neighbour at about the same memory sits just
    # above (the two labels would otherwise print over each other between the points).
    span = max((x for x, _ in points), default=0.0) or 1.0
    for (x, y), names in sorted(points.items()):
        crowded = any(abs(x2 - x) < 0.05 * span and 0 < y2 - y < 15 for x2, y2 in points)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(7, -14 if crowded else 8),
                    fontsize=8)

    xs = [c.peak_kv_bytes / 2**20 for c in report.configs]
    ax.set_xlim(0, max(max(xs) * 1.25, 1e-3))
    ax.set_ylim(-5, 110)
    ax.set_xlabel("peak KV memory (MiB)")
    ax.set_ylabel("accuracy (%)")
    questions = report.configs[0].total
    ax.set_title(f"{_model_label(report.model)}: accuracy vs peak KV memory\n"
                 f"{questions} questions, {len(report.traces)} traces")
    ax.grid(True, alpha=0.3)
    # Below the axes: inside, it would hide points (a tiny model's are all near 0 %).
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(str(path), format="png")
    return path
