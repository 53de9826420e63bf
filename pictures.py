"""The model card's pictures, ``predictions.png`` and ``ics.png``; numpy and Pillow only. Text is set in the
TrueType font Pillow ships (Aileron, ``ImageFont.load_default(size)``, Pillow >= 10.1) word by word, ``WORD_GAP``
apart: the font's own space, 2-3 px at these sizes, runs words together."""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_NUM_PICTURES = 4
IGNORE_COLOUR = (224, 224, 192)  # ignored pixels (Pascal VOC's boundary colour)
TEXT_SIZE, SMALL_SIZE, WORD_GAP, PAD = 14, 12, 5, 10  # px; PAD: ics.png's margin
MIN_ICS_WIDTH = 480  # narrower (few classes, no teacher), the caption would wrap after every other word


@dataclass
class PictureRow:
    """One validation image: its ``index`` in the evaluation set, ``image`` (H, W, 3) uint8 RGB, ``label`` (H, W)
    int class ids (ignore index allowed), the ``student``'s and ``teacher``'s (H, W) int predictions (teacher None
    without one) and their (C, C) row-normalised inter-class similarity matrices on this image."""

    index: int
    image: np.ndarray
    label: np.ndarray
    student: np.ndarray
    teacher: np.ndarray | None = None
    student_ics: np.ndarray | None = None
    teacher_ics: np.ndarray | None = None


def picture_indices(num_images: int, count: int = DEFAULT_NUM_PICTURES) -> list[int]:
    """``count`` fixed indices spread evenly over ``range(num_images)``, first and last included."""
    if count >= num_images:
        return list(range(max(0, num_images)))
    return sorted({round(i * (num_images - 1) / max(1, count - 1)) for i in range(max(0, count))})


def class_palette(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8: one fixed colour per class, never black, white or the ignore colour. Hues evenly
    spaced round the wheel are visited with a stride of about 3/8 of a turn, so neighbouring class ids differ
    clearly; saturation and brightness alternate along the wheel, so neighbouring hues do too."""
    stride = max(1, round(0.38 * num_labels))
    while math.gcd(stride, num_labels) != 1:  # a stride sharing a factor with C would repeat hues
        stride += 1
    colours = [colorsys.hsv_to_rgb((0.02 + s / num_labels) % 1.0, (0.85, 0.55)[s % 2], (0.95, 0.7)[(s // 2) % 2])
               for s in (c * stride % num_labels for c in range(num_labels))]  # s: the class's slot on the wheel
    return np.round(255 * np.array(colours, dtype=np.float64).reshape(num_labels, 3)).astype(np.uint8)


def colourize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette (the ignore index) get IGNORE_COLOUR."""
    label = np.asarray(label).astype(np.int64)
    known = (label >= 0) & (label < len(palette))
    return np.vstack([palette, IGNORE_COLOUR]).astype(np.uint8)[np.where(known, label, len(palette))]


def mean_ics(rows: Sequence[PictureRow], role: str) -> np.ndarray | None:
    """The mean over ``rows`` of their ``{role}_ics`` matrices (C, C), or None when none has one."""
    found = [getattr(row, f"{role}_ics") for row in rows if getattr(row, f"{role}_ics") is not None]
    # An image without a valid pixel may give NaN rows: they are drawn as 0, not allowed to poison the mean.
    return np.nan_to_num(np.mean(np.stack(found), axis=0)) if found else None


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's own TrueType font (Aileron Regular) at ``size`` px."""
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> int:
    """Width in px of ``text`` as :func:`draw_text` sets it at ``size`` px."""
    words = text.split(" ")
    return math.ceil(sum(font(size).getlength(word) for word in words)) + WORD_GAP * (len(words) - 1)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill: str = "black") -> None:
    """Set ``text`` with its top left corner at ``xy``, word by word."""
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill, font=font(size))
        x += font(size).getlength(word) + WORD_GAP


def wrap(text: str, size: int, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` px (a longer word keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def draw_predictions(rows: Sequence[PictureRow], id2label: dict[int, str], cell_width: int = 320) -> Image.Image:
    """Rows of image | ground truth | teacher | student (no teacher column without a teacher) below a 24 px
    header, cells ``cell_width`` wide and 6 px apart, masks in :func:`class_palette`'s colours, a legend below."""
    if not rows:
        raise ValueError("draw_predictions needs at least one row")
    palette, gap, header, swatch = class_palette(len(id2label)), 6, 24, 14
    with_teacher = any(row.teacher is not None for row in rows)
    titles = ["image", "ground truth", *(["teacher"] if with_teacher else []), "student"]
    cells = []
    for row in rows:
        size = (cell_width, max(1, round(row.label.shape[0] * cell_width / row.label.shape[1])))
        cells.append([Image.fromarray(row.image).resize(size, Image.BILINEAR)] + [
            Image.new("RGB", size, "white") if mask is None  # a teacher missing for this row only
            else Image.fromarray(colourize(mask, palette)).resize(size, Image.NEAREST)
            for mask in [row.label, *([row.teacher] if with_teacher else []), row.student]])
    legend = [(id2label[i], tuple(int(v) for v in palette[i])) for i in range(len(palette))]
    if any(bool(((row.label < 0) | (row.label >= len(palette))).any()) for row in rows):
        legend.append(("ignored", IGNORE_COLOUR))
    width, grid_h = len(titles) * (cell_width + gap) + gap, header + sum(c[0].height + gap for c in cells) + gap
    entry_w = max(text_width(name, TEXT_SIZE) for name, _ in legend) + swatch + 24
    per_line = max(1, (width - 8) // entry_w)
    canvas = Image.new("RGB", (width, grid_h + -(-len(legend) // per_line) * (swatch + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        x = gap + c * (cell_width + gap) + (cell_width - text_width(title, TEXT_SIZE)) // 2
        draw_text(draw, (x, 4), title, TEXT_SIZE)
    y = header
    for row, images in zip(rows, cells):
        for c, image in enumerate(images):
            canvas.paste(image, (gap + c * (cell_width + gap), y))
        draw.rectangle([gap, y, gap + text_width(f"#{row.index}", TEXT_SIZE) + 8, y + 18], fill="black")
        draw_text(draw, (gap + 4, y + 1), f"#{row.index}", TEXT_SIZE, fill="white")
        y += images[0].height + gap
    for i, (name, colour) in enumerate(legend):
        x, y = 8 + (i % per_line) * entry_w, grid_h + 8 + (i // per_line) * (swatch + 8)
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(90, 90, 90))
        draw_text(draw, (x + swatch + 4, y), name, TEXT_SIZE)
    return canvas


def _heat(values: np.ndarray, vmax: float) -> np.ndarray:
    """[0, vmax] -> (..., 3) uint8, white through mid blue to deep navy."""
    anchors = np.array([(255, 255, 255), (110, 170, 215), (10, 45, 110)], dtype=np.float64)
    t = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values)
    return np.round(np.stack([np.interp(t, [0, 0.5, 1], anchors[:, c]) for c in range(3)], -1)).astype(np.uint8)


def draw_ics(rows: Sequence[PictureRow], id2label: dict[int, str], temperature: float) -> Image.Image:
    """The teacher's and the student's inter-class similarity matrices side by side (the student alone without a
    teacher), averaged over ``rows`` on one colour scale, a colour bar, and a caption wrapped to fit."""
    panels = [(role, m) for role in ("teacher", "student") if (m := mean_ics(rows, role)) is not None]
    if not panels:
        raise ValueError("draw_ics needs rows with ICS matrices")
    num = len(id2label)
    cell, top = int(min(28, max(3, 420 // num))), 44
    labels = [f"{i}: {id2label[i]}" for i in range(num)] if num <= 40 else []
    left = max(text_width(t, SMALL_SIZE) for t in labels) + 8 if labels else 0
    panel_w, bar_y = left + num * cell + PAD, top + num * cell + PAD
    width, vmax = max(MIN_ICS_WIDTH, PAD + len(panels) * panel_w), float(max(m.max() for _, m in panels)) or 1.0
    caption = (f"Row-normalised inter-class similarity (KL divergence between the classes' spatial distributions, "
               f"T = {temperature:g}), mean over {len(rows)} validation images; row i, column j: how class i's map "
               "differs from class j's.")
    if len(panels) == 2:
        caption += (f" Mean squared difference teacher - student: "
                    f"{float(np.mean((panels[0][1] - panels[1][1]) ** 2)):.5f} (what ICSD minimises).")
    lines, line_h = wrap(caption, SMALL_SIZE, width - 2 * PAD), SMALL_SIZE + 6
    canvas = Image.new("RGB", (width, bar_y + 36 + line_h * len(lines) + PAD), "white")
    draw, side = ImageDraw.Draw(canvas), num * cell
    for p, (role, matrix) in enumerate(panels):  # title above, class names left of the rows, ids above the columns
        x0 = PAD + p * panel_w + left
        draw_text(draw, (x0 + (side - text_width(role, TEXT_SIZE)) // 2, 4), role, TEXT_SIZE)
        canvas.paste(Image.fromarray(_heat(matrix, vmax)).resize((side, side), Image.NEAREST), (x0, top))
        draw.rectangle([x0 - 1, top - 1, x0 + side, top + side], outline=(120, 120, 120))
        for i, text in enumerate(labels):
            draw_text(draw, (x0 - 4 - text_width(text, SMALL_SIZE), top + i * cell + (cell - SMALL_SIZE) // 2), text,
                      SMALL_SIZE)
            draw_text(draw, (x0 + i * cell + (cell - text_width(str(i), SMALL_SIZE)) // 2, top - 16), str(i),
                      SMALL_SIZE)
    canvas.paste(Image.fromarray(_heat(np.tile(np.linspace(0, vmax, 256), (14, 1)), vmax)), (PAD + left, bar_y))
    draw_text(draw, (PAD + left, bar_y + 16), "0", SMALL_SIZE)
    draw_text(draw, (PAD + left + 256 - text_width(f"{vmax:.3f}", SMALL_SIZE), bar_y + 16), f"{vmax:.3f}", SMALL_SIZE)
    for i, line in enumerate(lines):
        draw_text(draw, (PAD, bar_y + 36 + i * line_h), line, SMALL_SIZE)
    return canvas
