"""Pillow building blocks of the explanation pictures: a colour scale, markers, panels in a
grid with labels, and a legend strip under a picture. Coordinates are pixels of the canvas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Color",
    "LegendEntry",
    "font",
    "scale_color",
    "fitted",
    "tint",
    "dot",
    "cross",
    "grid",
    "with_legend",
]

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
# a perceptually ordered scale (viridis-like): dark purple -> blue -> green -> yellow
_SCALE: tuple[Color, ...] = (
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
)


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def scale_color(value: float) -> Color:
    """The colour of ``value`` in ``[0, 1]`` (clipped) on the legend's colour scale."""
    v = min(max(float(value), 0.0), 1.0) * (len(_SCALE) - 1)
    i = min(int(v), len(_SCALE) - 2)
    t = v - i
    a, b = _SCALE[i], _SCALE[i + 1]
    return tuple(round(a[c] + t * (b[c] - a[c])) for c in range(3))  # type: ignore[return-value]


def tint(color: Color, amount: float) -> Color:
    """``color`` blended towards white by ``amount`` in ``[0, 1]``."""
    return tuple(round(c + (255 - c) * amount) for c in color)  # type: ignore[return-value]


def fitted(image: Image.Image, long_side: int, mute: float = 0.35) -> Image.Image:
    """``image`` (RGB) resized so that its longer side is ``long_side`` pixels, blended by
    ``mute`` towards grey so that what is drawn on it stands out."""
    w, h = image.size
    s = long_side / max(w, h)
    out = image.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))))
    return Image.blend(out, Image.new("RGB", out.size, (128, 128, 128)), mute) if mute else out


def dot(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: Color) -> None:
    """A filled circle of radius ``r`` with a thin black outline."""
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=BLACK)


def cross(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, color: Color) -> None:
    """A ``+`` marker, outlined in black so it shows on any background."""
    for width, c in ((4, BLACK), (2, color)):
        draw.line([x - r, y, x + r, y], fill=c, width=width)
        draw.line([x, y - r, x, y + r], fill=c, width=width)


def grid(
    panels: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    gap: int = 6,
) -> Image.Image:
    """Panels (rows of images of one size) on white, labelled left and on top."""
    f = font()
    pw, ph = panels[0][0].size
    left = 8 + max((int(f.getlength(t)) for t in row_labels), default=0)
    top = 22
    rows, cols = len(panels), max(len(r) for r in panels)
    canvas = Image.new("RGB", (left + cols * (pw + gap), top + rows * (ph + gap)), WHITE)
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((left + j * (pw + gap), 4), label, fill=BLACK, font=f)
    for i, row in enumerate(panels):
        y = top + i * (ph + gap)
        if i < len(row_labels):
            draw.text((4, y + ph // 2 - 7), row_labels[i], fill=BLACK, font=f)
        for j, panel in enumerate(row):
            canvas.paste(panel, (left + j * (pw + gap), y))
    return canvas


@dataclass
class LegendEntry:
    """One legend line: a swatch (``marker``: ``box``, ``dot``, ``cross``, ``line`` or
    ``none``) of ``color`` and its text."""

    text: str
    color: Color = BLACK
    marker: str = "box"


def _swatch(draw: ImageDraw.ImageDraw, x: int, y: int, entry: LegendEntry) -> None:
    c = entry.color
    if entry.marker == "box":
        draw.rectangle([x, y + 2, x + 14, y + 13], outline=c, width=2)
    elif entry.marker == "dot":
        dot(draw, x + 7, y + 7, 5, c)
    elif entry.marker == "cross":
        cross(draw, x + 7, y + 7, 6, c)
    elif entry.marker == "line":
        draw.line([x, y + 7, x + 14, y + 7], fill=c, width=3)
    elif entry.marker == "fill":
        draw.rectangle([x, y + 2, x + 14, y + 13], fill=c, outline=BLACK)


def _wrapped(text: str, f, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (at spaces)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and f.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line]


def with_legend(
    picture: Image.Image,
    title: str,
    entries: Sequence[LegendEntry],
    colorbar: tuple[str, float, float] | None = None,
) -> Image.Image:
    """``picture`` with a title above and a legend strip below: one entry per line (wrapped),
    then an optional colour bar ``(label, low, high)`` of :func:`scale_color`."""
    f, big = font(), font(15)
    width = max(picture.width, 420)
    texts = [_wrapped(e.text, f, width - 40) for e in entries]
    lines = sum(len(t) for t in texts) + (2 if colorbar else 0)
    head, foot = 26, 10 + 18 * lines
    canvas = Image.new("RGB", (width, head + picture.height + foot), WHITE)
    canvas.paste(picture, (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), title, fill=BLACK, font=big)
    y = head + picture.height + 6
    for entry, text in zip(entries, texts):
        _swatch(draw, 8, y, entry)
        for line in text:
            draw.text((30, y), line, fill=BLACK, font=f)
            y += 18
    if colorbar is not None:
        label, low, high = colorbar
        bar = min(300, width - 120)
        for i in range(bar):
            draw.line([8 + i, y + 2, 8 + i, y + 14], fill=scale_color(i / max(bar - 1, 1)))
        draw.text((8, y + 17), f"{low:.3g}", fill=BLACK, font=f)
        draw.text((bar - 20, y + 17), f"{high:.3g}", fill=BLACK, font=f)
        draw.text((bar + 16, y), label, fill=BLACK, font=f)
    return canvas
