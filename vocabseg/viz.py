"""Colouring label maps and drawing them over photos with a legend.

Conventions shared by all functions here: a label map is an H×W integer array of class indices;
``-1`` always means "ignore", and ``255`` means "ignore" too unless 255 is a real class (that is,
when there are more than 255 classes). Ignored pixels are black in :func:`colorize`, keep the
original photo in :func:`overlay`, and are left out of :func:`class_areas`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vocabseg.errors import ImageError, VocabularyError
from vocabseg.io import ImageInput, load_image
from vocabseg.palette import make_palette

__all__ = ["class_areas", "colorize", "make_palette", "overlay"]

# --------------------------------------------------------------------------------------------
# label maps
# --------------------------------------------------------------------------------------------


# Colour words a class name may contain, and the colour a reader expects for them.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 80, 230), "yellow": (245, 215, 30),
    "orange": (250, 140, 20), "purple": (130, 50, 180), "pink": (250, 140, 200), "white": (245, 245, 245),
    "black": (25, 25, 25), "brown": (125, 75, 35), "gray": (128, 128, 128), "grey": (128, 128, 128),
}


def palette_for(names: Sequence[str], seed: int = 0) -> np.ndarray:
    """Distinct colours for ``names``, except that a name with one colour word ("red circle") is drawn in that
    colour when no other name has the same colour word — so a legend reads naturally."""
    palette = make_palette(len(names), seed).copy()
    words = [[w for w in name.lower().replace(",", " ").split() if w in NAMED_COLORS] for name in names]
    counts: dict[str, int] = {}
    for ws in words:
        if len(ws) == 1:
            counts[ws[0]] = counts.get(ws[0], 0) + 1
    for i, ws in enumerate(words):
        if len(ws) == 1 and counts[ws[0]] == 1:
            palette[i] = NAMED_COLORS[ws[0]]
    return palette


def _as_label_map(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ImageError(f"A label map must be an H×W array, got shape {tuple(labels.shape)}.")
    if labels.dtype == np.bool_:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageError(f"A label map must hold integer class indices, got dtype {labels.dtype}.")
    return labels.astype(np.int64, copy=False)


def _valid_mask(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Pixels that carry a class; raise if some index is neither a class nor an ignore value."""
    ignore = labels == -1
    if num_classes <= 255:
        ignore |= labels == 255
    valid = ~ignore
    if labels.size and valid.any():
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bad.any():
            value = int(labels[bad][0])
            raise VocabularyError(
                f"The label map contains class index {value} but only {num_classes} {what} were given."
            )
    return valid


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Map an H×W label map to an H×W×3 uint8 colour image; ignored pixels (-1, 255) are black.

    ``palette`` defaults to :func:`make_palette` with one colour per class up to the largest index.
    """
    labels = _as_label_map(labels)
    if palette is None:
        valid = (labels >= 0) & (labels != 255)
        n = int(labels[valid].max()) + 1 if valid.any() else 1
        palette = make_palette(n)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must have shape [n, 3], got {tuple(palette.shape)}")
    valid = _valid_mask(labels, len(palette), "palette colours")
    table = np.concatenate([np.clip(palette, 0, 255).astype(np.uint8), np.zeros((1, 3), np.uint8)])
    return table[np.where(valid, labels, len(palette))]


def class_areas(labels: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Return ``{"name", "index", "pixels", "fraction"}`` for each class present, largest first.

    ``fraction`` is the share of ALL pixels of the map (ignored pixels included), so the shares of
    the listed classes sum to the labelled part of the image. Ties are broken by class index.
    """
    labels = _as_label_map(labels)
    valid = _valid_mask(labels, len(names), "class names")
    counts = np.bincount(labels[valid], minlength=len(names))
    total = labels.size
    present = np.flatnonzero(counts)
    present = present[np.lexsort((present, -counts[present]))]
    return [
        {"name": str(names[i]), "index": int(i), "pixels": int(counts[i]), "fraction": counts[i] / total}
        for i in present
    ]


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------


def _boundaries(labels: np.ndarray, thickness: int) -> np.ndarray:
    """Mask of pixels next to a label change (4-neighbourhood), widened to ``thickness`` pixels."""
    edge = np.zeros(labels.shape, dtype=bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= dx
    edge[:-1, :] |= dy
    for _ in range(thickness - 1):  # grow by one pixel right and down per step
        grown = edge.copy()
        grown[:, 1:] |= edge[:, :-1]
        grown[1:, :] |= edge[:-1, :]
        edge = grown
    return edge


def _load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable on Pillow >= 10.1 with FreeType
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _text_box(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[str, int, int]:
    """Return text that the font can encode, with its width and height in pixels."""
    try:
        box = draw.textbbox((0, 0), text, font=font)
    except UnicodeEncodeError:  # the bitmap fallback font only knows Latin-1
        text = text.encode("latin-1", "replace").decode("latin-1")
        box = draw.textbbox((0, 0), text, font=font)
    return text, box[2], box[3]


def _shorten(name: str, limit: int = 32) -> str:
    name = " ".join(str(name).split())
    return name if len(name) <= limit else name[: limit - 3] + "..."


def overlay(
    image: ImageInput,
    labels: np.ndarray,
    names: Sequence[str],
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    max_legend_entries: int = 20,
) -> Image.Image:
    """Draw a label map over ``image`` for a human to check a segmentation.

    The class colours are blended with weight ``alpha``, segment boundaries are drawn as thin white
    lines, and (if ``legend``) a white panel lists the classes present, largest first, with colour
    swatch and percentage of the image; classes beyond ``max_legend_entries`` are summed in one
    "+N more" line. The panel goes to the right of the image, or below it for wide images, and its
    font scales with the image size. Ignored pixels keep the photo unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if max_legend_entries < 1:
        raise ValueError(f"max_legend_entries must be at least 1, got {max_legend_entries}")
    rgb = load_image(image)
    labels = _as_label_map(labels)
    h, w = rgb.shape[:2]
    if labels.shape != (h, w):
        raise ImageError(f"The label map is {labels.shape[1]}×{labels.shape[0]} but the image is {w}×{h}.")
    if len(names) == 0:
        raise VocabularyError("overlay needs at least one class name.")
    if palette is None:
        palette = palette_for(names)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < len(names):
        raise ValueError(f"palette must have shape [n >= {len(names)}, 3], got {tuple(palette.shape)}")

    valid = _valid_mask(labels, len(names), "class names")
    colours = colorize(np.where(valid, labels, -1), palette[: len(names)])
    out = rgb.astype(np.float32)
    blended = (1 - alpha) * out + alpha * colours.astype(np.float32)
    out = np.where(valid[..., None], blended, out)
    thickness = max(1, round(max(h, w) / 600))
    out[_boundaries(np.where(valid, labels, -1), thickness)] = 255.0
    picture = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if not legend:
        return picture
    return _add_legend(picture, class_areas(labels, names), palette, max_legend_entries)


def _add_legend(
    picture: Image.Image, areas: list[dict], palette: np.ndarray, max_entries: int
) -> Image.Image:
    w, h = picture.size
    font_size = int(min(64, max(10, round(math.sqrt(w * h) / 40))))
    font = _load_font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    entries: list[tuple[str, tuple[int, int, int] | None]] = []
    shown = areas[:max_entries]
    for a in shown:
        colour = tuple(int(v) for v in palette[a["index"]])
        entries.append((f"{_shorten(a['name'])}  {100 * a['fraction']:.1f}%", colour))
    rest = areas[max_entries:]
    if rest:
        share = 100 * sum(a["fraction"] for a in rest)
        entries.append((f"+{len(rest)} more  {share:.1f}%", None))
    if not entries:
        entries.append(("(no labelled pixels)", None))

    measured = [(*_text_box(scratch, text, font), colour) for text, colour in entries]
    pad = max(2, font_size // 3)
    swatch = font_size
    line_h = max(swatch, max(m[2] for m in measured)) + pad
    entry_w = swatch + pad + max(m[1] for m in measured) + 2 * pad

    below = w > 1.5 * h
    if below:
        cols = max(1, (w - pad) // entry_w)
        rows = math.ceil(len(measured) / cols)
        panel_w, panel_h = max(w, entry_w + pad), rows * line_h + pad
        canvas = Image.new("RGB", (panel_w, h + panel_h), "white")
        origin = (0, h)
    else:
        cols, rows = 1, len(measured)
        panel_w, panel_h = entry_w + pad, rows * line_h + pad
        canvas = Image.new("RGB", (w + panel_w, max(h, panel_h)), "white")
        origin = (w, 0)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (text, _tw, th, colour) in enumerate(measured):
        col, row = divmod(k, rows) if below else (0, k)
        x = origin[0] + pad + col * entry_w
        y = origin[1] + pad + row * line_h
        if colour is not None:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + max(0, (swatch - th) // 2)), text, fill=(0, 0, 0), font=font)
    return canvas


# --------------------------------------------------------------------------------------------
# side-by-side comparison
# --------------------------------------------------------------------------------------------


def compare_grid(
    panels: Sequence[tuple[str, Image.Image]],
    names: Sequence[str],
    palette: np.ndarray,
    extra_entries: Sequence[tuple[str, tuple[int, int, int]]] = (),
    panel_width: int = 384,
    columns: int | None = None,
) -> Image.Image:
    """Titled panels in a grid with one shared legend below: every panel uses ``palette`` for ``names``, so one
    name has one colour across all of them. ``extra_entries`` adds legend lines (e.g. a referring sentence)."""
    if not panels:
        raise ValueError("compare_grid needs at least one panel")
    if panel_width < 64:
        raise ValueError(f"panel_width must be at least 64 pixels, got {panel_width}")
    columns = columns or min(len(panels), 4)
    scaled = []
    for title, picture in panels:
        w, h = picture.size
        scaled.append((title, picture.convert("RGB").resize((panel_width, max(1, round(h * panel_width / w))),
                                                            Image.BILINEAR)))
    font_size = max(12, panel_width // 24)
    font = _load_font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, font_size // 2)
    title_h = font_size + 2 * pad
    cell_h = title_h + max(p.size[1] for _, p in scaled)
    rows = math.ceil(len(scaled) / columns)
    entries = [(_shorten(n), tuple(int(v) for v in palette[i])) for i, n in enumerate(names)]
    entries += [(_shorten(t, 60), c) for t, c in extra_entries]
    measured = [(*_text_box(scratch, text, font), colour) for text, colour in entries]
    entry_w = font_size + 3 * pad + max((m[1] for m in measured), default=0)
    total_w = columns * panel_width + (columns + 1) * pad
    per_row = max(1, (total_w - pad) // entry_w)
    legend_rows = math.ceil(len(measured) / per_row)
    line_h = font_size + pad
    canvas = Image.new("RGB", (total_w, rows * (cell_h + pad) + pad + legend_rows * line_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (title, picture) in enumerate(scaled):
        r, c = divmod(k, columns)
        x, y = pad + c * (panel_width + pad), pad + r * (cell_h + pad)
        text, tw, th = _text_box(draw, _shorten(title, 48), font)
        draw.text((x + max(0, (panel_width - tw) // 2), y + pad), text, fill=(0, 0, 0), font=font)
        canvas.paste(picture, (x, y + title_h))
    top = pad + rows * (cell_h + pad)
    for k, (text, _tw, th, colour) in enumerate(measured):
        r, c = divmod(k, per_row)
        x, y = pad + c * entry_w, top + r * line_h
        draw.rectangle([x, y, x + font_size - 1, y + font_size - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + font_size + pad, y + max(0, (font_size - th) // 2)), text, fill=(0, 0, 0), font=font)
    return canvas
