"""The one way a plot reaches the disk."""
import os


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """A matplotlib figure to PNG via temp + rename (never a half-written plot)."""
    plt = pyplot()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")   # colour-bar labels stay inside
    plt.close(fig)
    os.replace(tmp, path)
    return path
