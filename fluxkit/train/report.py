"""What a run shows while it trains: the loss-curve PNG and image grids (all written atomically, rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_write


def plot_losses(history: list[float], path: Path, title: str) -> None:
    """Per-step loss (faint) and its running average (EMA over ~1% of the run), log scale."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in a headless training job
    import matplotlib.pyplot as plt

    if not history:
        return
    losses = np.asarray(history, dtype=np.float64)
    alpha = min(1.0, 10.0 / max(len(losses), 1) + 0.01)
    smooth = np.empty_like(losses)
    acc = losses[0]
    for i, x in enumerate(losses):
        acc = (1 - alpha) * acc + alpha * x
        smooth[i] = acc
    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label="running mean")
    if (losses > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: step {len(losses)}, last {smooth[-1]:.4g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def to_uint8(images) -> list[np.ndarray]:
    """Tensor [B, 3, H, W] in [-1, 1] -> list of (H, W, 3) uint8."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


def save_grid(rows: list[list[np.ndarray]], path: Path, labels: list[str] | None = None, pad: int = 2) -> None:
    """Rows of (H, W, 3) uint8 images (sizes may differ) -> one PNG, each row optionally labelled on the left."""
    label_w = 8 + 7 * max((len(s) for s in labels), default=0) if labels else 0
    cell_w = max(im.shape[1] for row in rows for im in row)
    heights = [max(im.shape[0] for im in row) for row in rows]
    width = label_w + pad + max(len(row) for row in rows) * (cell_w + pad)
    canvas = Image.new("RGB", (width, sum(heights) + pad * (len(rows) + 1)), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, y + heights[r] // 2 - 5), labels[r], fill=(230, 230, 230))
        for c, im in enumerate(row):
            canvas.paste(Image.fromarray(im), (label_w + pad + c * (cell_w + pad), y))
        y += heights[r] + pad
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
