"""The one heatmap both scorecards draw: compositions x columns, coloured by change vs the base, values written in."""

from __future__ import annotations

from pathlib import Path


def heatmap(path: Path, rows: list[str], columns: list[str], colour: list[list[float]],
            text: list[list[float | None]], scale: tuple[str, float, float], colour_label: str, title: str) -> None:
    """`scale` = (matplotlib colormap, vmin, vmax); a None in `text` leaves that cell blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap, vmin, vmax = scale
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.5, 0.55 * len(rows) + 1.5))
    image = ax.imshow(colour, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=9)
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(text):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=colour_label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
