"""The results charts of `memo eval`: one run's metrics per method, a sweep's F1 per noise level."""

from __future__ import annotations

from pathlib import Path


def grouped_bars(path: Path, title: str, names: list[str], series: dict[str, list[float]],
                 errors: dict[str, list[float]] | None = None) -> None:
    """A bar group per method, a bar per series (metric or noise level), scores on [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label,
               yerr=(errors or {}).get(label))
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
