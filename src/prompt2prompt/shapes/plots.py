"""Drawing a training run's loss log."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

_TICK = 0.25  # decades between the loss axis's grid lines
_LEFT, _RIGHT, _TOP_BOTTOM = 60, 16, 28  # px of each panel's margins: the tick labels, the border, the title and step label
_FLOOR = 1e-8  # losses below this are drawn at it (the log of 0)

def plot_loss(csv_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 720, height: int = 300) -> Path:
    """Draw a run's ``loss.csv`` (one panel per stage, log-scale loss against step) as a PNG."""
    from PIL import Image, ImageDraw

    rows: dict[str, list[tuple[int, float]]] = {}
    for line in Path(csv_path).read_text().splitlines()[1:]:
        stage, step, loss = line.split(",")[:3]
        rows.setdefault(stage, []).append((int(step), float(loss)))
    if not rows:
        raise ValueError(f"{csv_path} holds no loss rows; train a few hundred steps first")
    img = Image.new("RGB", (width, height * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for k, (stage, points) in enumerate(rows.items()):
        top, left, right, bottom = k * height + _TOP_BOTTOM, _LEFT, width - _RIGHT, (k + 1) * height - _TOP_BOTTOM
        steps = [s for s, _ in points]
        logs = [math.log10(max(v, _FLOOR)) for _, v in points]
        lo, hi = math.floor(min(logs) / _TICK) * _TICK, math.ceil(max(logs) / _TICK) * _TICK + 1e-9  # whole ticks; hi > lo
        x = lambda s: left + (right - left) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
        y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)  # noqa: E731
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        for tick in np.arange(lo, hi, _TICK):
            draw.line((left, y(tick), right, y(tick)), fill=(225, 225, 225))
            draw.text((4, y(tick) - 6), f"{10 ** tick:.3g}", fill="black")
        draw.line([(x(s), y(v)) for s, v in zip(steps, logs)], fill=(40, 80, 220), width=2)
        draw.text((left, top - 20), f"{stage}: training loss (log scale) vs step, {steps[0]}..{steps[-1]}", fill="black")
        draw.text((right - 60, bottom + 6), f"step {steps[-1]}", fill="black")
    out = Path(png_path)
    tmp = out.with_name(out.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, out)
    return out

