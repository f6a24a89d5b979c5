"""Plain drawings made outside the world generator: the embedded default's out-of-distribution test set.

`vocabseg.data.world` renders the training scenes; this module draws test images with separate code (its own
shape outlines, backgrounds, edge treatments and degradations) so that the embedded default is measured on
drawings it never saw, the way a new user would make them with PIL: a few flat-coloured shapes, each of a unique
colour, on a plain paper colour or on a background the world names (sky, grass, water, road, sand, wall).

Every drawing carries its ground truth: ``labels[y, x]`` indexes ``names`` (the obvious vocabulary: one
"<colour> <shape>" per object, then the background's name). Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import COLOR_RGB, COLORS, OBJECT_CATEGORIES

__all__ = ["Drawing", "shape_outline", "draw_scene", "random_drawing", "drawing_set", "issue_drawings",
           "same_color_drawings", "PAPER_RGB", "NAMED_BACKGROUNDS"]

#: Plain paper colours; their vocabulary name is "background".
PAPER_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "light grey": (226, 226, 226), "grey": (200, 200, 200), "cream": (250, 243, 222),
}
#: Backgrounds the world names, with the colour(s) this module paints them in (not the generator's textures).
NAMED_BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "water", "road", "sand", "wall")


@dataclass
class Drawing:
    """One test drawing and its ground truth."""

    image: np.ndarray                   # H x W x 3 uint8
    labels: np.ndarray                  # H x W int, index into names
    names: list[str]                    # objects first, background last
    kind: str = ""                      # what was varied (for the report)
    objects: list[dict] = field(default_factory=list)

    @property
    def background(self) -> str:
        return self.names[-1]


def _regular(n: int, r: float, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(start + 2 * math.pi * k / n), r * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def shape_outline(shape: str, radius: float) -> list[list[tuple[float, float]]] | None:
    """Polygon(s) of ``shape`` centred on 0, circumscribed radius ``radius`` (None: circle and ring, drawn as
    ellipses). A list of polygons: the first is filled, the rest are cut out (the crescent's bite)."""
    r = radius
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        s = r / math.sqrt(2)
        return [[(-s, -s), (s, -s), (s, s), (-s, s)]]
    if shape == "triangle":
        return [_regular(3, r)]
    if shape == "hexagon":
        return [_regular(6, r, 0.0)]
    if shape == "star":
        outer, inner = _regular(5, r), _regular(5, 0.42 * r, -math.pi / 2 + math.pi / 5)
        return [[p for pair in zip(outer, inner) for p in pair]]
    if shape == "cross":
        a, b = 0.3 * r, 0.92 * r
        return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                 (-a, -a)]]
    if shape == "arrow":
        return [[(-r, -0.22 * r), (0.15 * r, -0.22 * r), (0.15 * r, -0.6 * r), (r, 0.0), (0.15 * r, 0.6 * r),
                 (0.15 * r, 0.22 * r), (-r, 0.22 * r)]]
    if shape == "heart":
        pts = []
        for k in range(64):  # the classic parametric heart, scaled to the radius
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17.0, (y + 2.5) * r / 17.0))
        return [pts]
    if shape == "crescent":
        return [[(r * math.cos(2 * math.pi * k / 64), r * math.sin(2 * math.pi * k / 64)) for k in range(64)],
                [(0.45 * r + 0.85 * r * math.cos(2 * math.pi * k / 64), -0.15 * r + 0.85 * r * math.sin(2 * math.pi * k / 64))
                 for k in range(64)]]
    raise ValueError(f"unknown shape {shape!r}; choose from {list(OBJECT_CATEGORIES)}")


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, h: int, w: int, ss: int) -> np.ndarray:
    """Coverage in [0, 1] of one shape on an h x w canvas, drawn at ``ss`` x resolution and box-averaged."""
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * ss, cy * ss, radius * ss
    if shape in ("circle", "ring"):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse([x - ri, y - ri, x + ri, y + ri], fill=0)
    else:
        polys = shape_outline(shape, r)
        cos, sin = math.cos(angle), math.sin(angle)
        for k, poly in enumerate(polys):
            pts = [(x + px * cos - py * sin, y + px * sin + py * cos) for px, py in poly]
            draw.polygon(pts, fill=255 if k == 0 else 0)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    return a.reshape(h, ss, w, ss).mean(axis=(1, 3)) if ss > 1 else a


def _background(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Paint a background: flat paper, or a simple rendering of a named background (own recipes)."""
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    if name in PAPER_RGB:
        base = np.array(PAPER_RGB[name], np.float32) + rng.uniform(-6, 6, 3)
        return np.broadcast_to(base, (h, w, 3)).copy()
    if name == "sky":
        top, bottom = np.array([70, 130, 215], np.float32), np.array([175, 210, 245], np.float32)
        img = top + (bottom - top) * yy + 0 * xx
        for _ in range(int(rng.integers(0, 3))):  # a soft cloud or two
            cy, cx, s = rng.uniform(0.1, 0.6), rng.uniform(0, 1), rng.uniform(0.05, 0.12)
            d = ((yy - cy) / (0.5 * s)) ** 2 + ((xx - cx) / s) ** 2
            img = img + (250 - img) * np.exp(-d) * 0.8
        return img
    if name == "grass":
        base = np.array([70, 150, 60], np.float32) + rng.uniform(-12, 12, 3)
        blades = rng.normal(0, 14, (h, w, 1)).astype(np.float32)
        return base + blades * np.array([0.6, 1.0, 0.5], np.float32) + (yy - 0.5) * 20
    if name == "water":
        base = np.array([40, 110, 165], np.float32)
        waves = np.sin(yy * rng.uniform(30, 60) + np.sin(xx * rng.uniform(6, 12)) * 2) * 12
        return base + waves * np.array([0.6, 0.9, 1.0], np.float32) + yy * 25
    if name == "road":
        base = np.array([88, 88, 92], np.float32) + rng.normal(0, 5, (h, w, 1)).astype(np.float32)
        img = base + 0 * xx
        mid = rng.uniform(0.3, 0.7)
        line = (np.abs(yy - mid) < 0.012) & ((xx * 8) % 1 < 0.5)
        return np.where(line, np.array([235, 225, 120], np.float32), img)
    if name == "sand":
        base = np.array([222, 198, 150], np.float32) + rng.uniform(-8, 8, 3)
        return base + rng.normal(0, 7, (h, w, 1)).astype(np.float32) + np.sin(xx * 25 + yy * 9) * 5
    if name == "wall":
        mortar, brick = np.array([205, 200, 190], np.float32), np.array([165, 75, 55], np.float32)
        bh = max(6, int(h * rng.uniform(0.04, 0.07)))
        bw = 2 * bh
        y, x = np.mgrid[:h, :w]
        row = y // bh
        xo = (x + (row % 2) * (bw // 2)) % bw
        is_mortar = ((y % bh) < max(1, bh // 7)) | (xo < max(1, bh // 7))
        shade = rng.uniform(-18, 18, (row.max() + 1, w // bw + 2))[row, (x + (row % 2) * (bw // 2)) // bw]
        img = np.where(is_mortar[..., None], mortar, brick + shade[..., None])
        return img.astype(np.float32)
    raise ValueError(f"unknown background {name!r}")


def _too_close(color: str, background_rgb: np.ndarray) -> bool:
    return float(np.abs(np.array(COLOR_RGB[color], np.float32) - background_rgb).mean()) < 45.0


def draw_scene(objects: list[dict], size: tuple[int, int], background: str, seed: int = 0, edges: str = "aa",
               jpeg_quality: int | None = None, noise: float = 0.0, kind: str = "") -> Drawing:
    """Draw ``objects`` (dicts with shape, color, cx, cy, radius as fractions of the short side, angle) in order.

    edges: "aa" (anti-aliased), "hard" (no anti-aliasing) or "blur" (anti-aliased, then Gaussian-blurred).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    img = _background(background, h, w, rng)
    labels = np.full((h, w), len(objects), np.int64)
    short = min(h, w)
    ss = 1 if edges == "hard" else 3
    for k, o in enumerate(objects):
        cov = _shape_mask(o["shape"], o["cx"] * w, o["cy"] * h, o["radius"] * short, o.get("angle", 0.0), h, w, ss)
        rgb = np.array(COLOR_RGB[o["color"]], np.float32) + np.asarray(o.get("jitter", (0, 0, 0)), np.float32)
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
        labels[cov >= 0.5] = k
    img = np.clip(img, 0, 255)
    if edges == "blur":
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0))),
                         np.float32)
    if noise > 0:
        img = img + rng.normal(0, noise, img.shape)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(jpeg_quality))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    names = [f"{o['color']} {o['shape']}" for o in objects]
    names.append("background" if background in PAPER_RGB else background)
    return Drawing(out, labels, names, kind, [dict(o) for o in objects])


def _place(rng: np.random.Generator, n: int, h: int, w: int, min_cover: float, max_cover: float,
           tries: int = 200) -> list[tuple[float, float, float]]:
    """Centres and radii (fractions) of ``n`` non-overlapping discs, each covering min..max of the image."""
    short, area = min(h, w), h * w
    placed: list[tuple[float, float, float]] = []
    budget = max_cover
    for _ in range(n):
        for _ in range(tries):
            cover = math.exp(rng.uniform(math.log(min_cover), math.log(max(min_cover, min(max_cover, budget)))))
            r_px = math.sqrt(cover * area / math.pi) * 1.1  # circumscribed radius of a shape of that area, roughly
            if 2 * r_px > 0.95 * short:
                continue
            cx = rng.uniform(r_px, w - r_px)
            cy = rng.uniform(r_px, h - r_px)
            if all(math.hypot(cx - px * w, cy - py * h) > r_px + pr * short + 4 for px, py, pr in placed):
                placed.append((cx / w, cy / h, r_px / short))
                budget -= cover
                break
        if budget < min_cover:
            break
    return placed


def random_drawing(seed: int) -> Drawing:
    """One drawing of the out-of-generator test set (what ``issues show 24`` lists as a user's plain drawings)."""
    rng = np.random.default_rng(seed)
    h, w = (int(rng.integers(256, 1025)) for _ in range(2))
    if rng.random() < 0.5:
        background = list(PAPER_RGB)[int(rng.integers(len(PAPER_RGB)))]
    else:
        background = NAMED_BACKGROUNDS[int(rng.integers(len(NAMED_BACKGROUNDS)))]
    bg_rgb = _background(background, 8, 8, np.random.default_rng(0)).reshape(-1, 3).mean(0)
    colors = [c for c in COLORS if not _too_close(c, bg_rgb)]
    n = int(rng.integers(1, 4))
    spots = _place(rng, n, h, w, 0.02, 0.6)
    chosen = rng.permutation(colors)[: len(spots)]
    objects = [{"shape": OBJECT_CATEGORIES[int(rng.integers(len(OBJECT_CATEGORIES)))], "color": str(c),
                "cx": cx, "cy": cy, "radius": r, "angle": float(rng.uniform(-0.3, 0.3)) if rng.random() < 0.5 else 0.0,
                "jitter": tuple(rng.uniform(-15, 15, 3).round(1))}
               for c, (cx, cy, r) in zip(chosen, spots)]
    edges = ("aa", "hard", "blur")[int(rng.integers(3))]
    jpeg = int(rng.integers(50, 96)) if rng.random() < 0.5 else None
    noise = float(rng.uniform(1, 6)) if rng.random() < 0.4 else 0.0
    kind = f"{w}x{h} {background} {edges}" + (f" jpeg{jpeg}" if jpeg else "") + (f" noise{noise:.0f}" if noise else "")
    return draw_scene(objects, (h, w), background, seed, edges, jpeg, noise, kind)


def drawing_set(n: int = 60, seed: int = 24_000_000) -> list[Drawing]:
    """The held-out drawing set: ``n`` random drawings (seeds never used by any training config)."""
    return [random_drawing(seed + i) for i in range(n)]


def issue_drawings() -> list[Drawing]:
    """The three drawings of issue #24, as a new user made them."""
    return [
        draw_scene([{"shape": "circle", "color": "red", "cx": 0.3, "cy": 0.5, "radius": 0.22},
                    {"shape": "square", "color": "blue", "cx": 0.72, "cy": 0.5, "radius": 0.25}],
                   (384, 512), "white", kind="red circle + blue square on white"),
        draw_scene([{"shape": "triangle", "color": "green", "cx": 0.3, "cy": 0.55, "radius": 0.25},
                    {"shape": "star", "color": "yellow", "cx": 0.72, "cy": 0.5, "radius": 0.26}],
                   (384, 512), "light grey", kind="green triangle + yellow star on light grey"),
        draw_scene([{"shape": "circle", "color": "blue", "cx": 0.2, "cy": 0.45, "radius": 0.18},
                    {"shape": "square", "color": "red", "cx": 0.5, "cy": 0.55, "radius": 0.2},
                    {"shape": "triangle", "color": "yellow", "cx": 0.8, "cy": 0.45, "radius": 0.2}],
                   (400, 640), "white", kind="blue circle + red square + yellow triangle on white"),
    ]


def same_color_drawings(n: int = 20, seed: int = 24_500_000) -> list[Drawing]:
    """Two shapes of the same colour side by side (e.g. red circle and red square): only the shape tells them apart."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        h, w = int(rng.integers(300, 700)), int(rng.integers(400, 900))
        background = list(PAPER_RGB)[int(rng.integers(len(PAPER_RGB)))]
        bg_rgb = np.array(PAPER_RGB[background], np.float32)
        color = str(rng.choice([c for c in COLORS if not _too_close(c, bg_rgb)]))
        a, b = rng.choice(len(OBJECT_CATEGORIES), 2, replace=False)
        short = min(h, w)
        r = float(rng.uniform(0.2, 0.28)) * min(1.0, (w / 2) / short)
        objects = [{"shape": OBJECT_CATEGORIES[a], "color": color, "cx": 0.27, "cy": float(rng.uniform(0.4, 0.6)),
                    "radius": r},
                   {"shape": OBJECT_CATEGORIES[b], "color": color, "cx": 0.73, "cy": float(rng.uniform(0.4, 0.6)),
                    "radius": r}]
        out.append(draw_scene(objects, (h, w), background, seed + i, ("aa", "hard")[i % 2],
                              kind=f"{color} {OBJECT_CATEGORIES[a]} + {color} {OBJECT_CATEGORIES[b]} on {background}"))
    return out
