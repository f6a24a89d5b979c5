"""The generated world: procedural images with per-pixel labels and captions.

No pretrained CLIP can be downloaded, so the project trains a tiny CLIP and a SAN segmenter on
images made here. A scene is a background of 1-3 "stuff" regions (sky, grass, water, ...) with
1-5 coloured, optionally textured shapes on top. Every sample carries:

* ``image``         H x W x 3 uint8 RGB,
* ``category_map``  H x W uint8, index into :data:`CATEGORY_MAP_NAMES` (stuff + object category),
* ``instance_map``  H x W, 0 = no object, k = ``objects[k - 1]`` (drawing order; later objects
  occlude earlier ones, labels show visible pixels only),
* ``stuff_map``     H x W uint8, index into :data:`STUFF_CLASSES` of the background under everything,
* ``objects`` / ``stuff`` records and ``captions`` (natural sentences built from synonym tables
  exposed here, so experiments know exactly which words captions can contain).

Any class scheme is derived from these maps with :func:`semantic_map` / :class:`WorldVocabulary`.
Everything is deterministic in ``(seed, config)``. Objects are drawn with PIL.ImageDraw at
``config.supersample`` x resolution inside their bounding box and box-filtered down (anti-aliased
RGB, labels by majority coverage); backgrounds and object textures are vectorised numpy with
analytic anti-aliasing, and noise comes from fixed tiles cropped at random offsets, which keeps
generation at hundreds of images per second per core.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vocabseg.errors import ConfigError, DatasetError, VocabularyError

__all__ = [
    "STUFF_CLASSES", "OBJECT_CATEGORIES", "COLORS", "TEXTURES", "SIZES", "SIZE_RANGES", "COLOR_RGB",
    "GROUND_LOOKALIKES", "CATEGORY_MAP_NAMES", "IGNORE_INDEX", "CATEGORY_SYNONYMS", "PLURALS", "STUFF_SYNONYMS",
    "COLOR_SYNONYMS", "TEXTURE_SYNONYMS", "SIZE_SYNONYMS", "GENERIC_OBJECT_WORDS", "COUNT_WORDS",
    "WorldConfig", "ObjectSpec", "StuffBand", "SceneSpec", "ObjectRecord", "StuffRecord",
    "WorldSample", "Mention", "NameQuery", "WorldVocabulary", "generate_sample", "sample_scene",
    "render_scene", "make_captions", "parse_caption", "parse_class_name", "caption_words",
    "class_names", "semantic_map", "sample_seed", "WorldDataset", "write_dataset",
]

# --------------------------------------------------------------------------------------------
# The world's vocabulary
# --------------------------------------------------------------------------------------------

# "background" is a plain, nearly uniform backdrop (a drawing on white paper): it lets the embedded default
# handle hand-drawn images, whose background is none of the natural stuff classes.
STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "sand", "wall", "road", "background")
OBJECT_CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross", "heart", "hexagon", "arrow", "crescent",
)
COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "brown",
)
TEXTURES: tuple[str, ...] = ("striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "medium", "large")
#: Object radius (circumscribed, in pixels) as a fraction of min(H, W), per size adjective.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.06, 0.10), "medium": (0.10, 0.16), "large": (0.16, 0.26),
}
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 55), "blue": (35, 75, 220), "yellow": (245, 215, 35),
    "orange": (250, 135, 20), "purple": (125, 45, 170), "pink": (250, 140, 195),
    "white": (245, 245, 245), "black": (22, 22, 22), "brown": (120, 70, 30),
}
#: Object colours that are hard to tell from each stuff class (low-contrast scenes: a white ring on grey paper, a
#: yellow triangle on sand, a black crescent on a road).
GROUND_LOOKALIKES: dict[str, tuple[str, ...]] = {
    "sky": ("blue", "white"), "grass": ("green",), "water": ("blue",), "sand": ("yellow", "orange", "brown"),
    "wall": ("brown", "red", "orange"), "road": ("black",), "background": ("white",),
}
#: Names of the indices stored in ``WorldSample.category_map`` (independent of the config).
CATEGORY_MAP_NAMES: tuple[str, ...] = STUFF_CLASSES + OBJECT_CATEGORIES
#: Label value for pixels that no class name claims (8-bit label maps).
IGNORE_INDEX = 255
#: Label value for "ignore" when a class list has more than 255 names (16-bit label maps).
IGNORE_INDEX_16 = 65535

# Caption words. The first synonym is the canonical name. Colour words are exactly the 10 base
# colours (no "crimson", no light/dark): experiments test unseen words against this table.
CATEGORY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"), "square": ("square", "box"),
    "triangle": ("triangle",), "star": ("star",), "ring": ("ring", "donut"),
    "cross": ("cross", "plus sign"), "heart": ("heart",), "hexagon": ("hexagon",),
    "arrow": ("arrow",), "crescent": ("crescent", "moon shape"),
}
PLURALS: dict[str, str] = {
    "circle": "circles", "disc": "discs", "round shape": "round shapes", "square": "squares",
    "box": "boxes", "triangle": "triangles", "star": "stars", "ring": "rings", "donut": "donuts",
    "cross": "crosses", "plus sign": "plus signs", "heart": "hearts", "hexagon": "hexagons",
    "arrow": "arrows", "crescent": "crescents", "moon shape": "moon shapes", "shape": "shapes",
    "object": "objects",
}
STUFF_SYNONYMS: dict[str, tuple[str, ...]] = {
    "sky": ("sky",), "grass": ("grass", "lawn"), "water": ("water", "sea", "lake"),
    "sand": ("sand", "beach"), "wall": ("wall", "bricks", "brick wall"), "road": ("road", "street"),
    "background": ("background", "plain background", "blank background"),
}
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS}
TEXTURE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "striped": ("striped", "stripy"), "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "checked"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"), "medium": ("medium",), "large": ("large", "big"),
}
#: Nouns that refer to any object ("two shapes over water").
GENERIC_OBJECT_WORDS: tuple[str, ...] = ("shape", "object")
COUNT_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10,
}
_NUMBER_NAMES = {v: k for k, v in COUNT_WORDS.items()}

# Phrases used to place objects in the scene, per stuff class.
_STUFF_PLACE = {
    "sky": ("in the sky", "against the sky"),
    "grass": ("on grass", "on the grass", "on a lawn", "on the lawn"),
    "water": ("over water", "on the water", "on the sea", "on a lake"),
    "sand": ("on sand", "on the sand", "on the beach", "on a beach"),
    "wall": ("in front of a wall", "against a brick wall", "in front of bricks"),
    "road": ("on the road", "on a street", "on the street"),
    "background": ("on a plain background", "on a white background", "on a blank background",
                   "on a background"),
}
_STUFF_NOUN = {
    "sky": ("the sky", "sky"), "grass": ("grass", "the lawn", "a lawn"),
    "water": ("water", "the sea", "a lake"), "sand": ("sand", "the beach", "a beach"),
    "wall": ("a wall", "a brick wall", "bricks"), "road": ("a road", "the road", "a street"),
    "background": ("a plain background", "a blank background", "a white background"),
}
_SECONDARY = ("next to {noun}", "near {noun}")
_SKY_SECONDARY = ("under the sky", "below the sky")

_TEMPLATES_BG = (
    "{objs} {bg}", "a photo of {objs} {bg}", "an image of {objs} {bg}",
    "a picture showing {objs} {bg}", "a rendering of {objs} {bg}", "{bg} there {be} {objs}",
    "{objs}, with {stuffs} behind", "a view of {stuffs} with {objs}",
)
_TEMPLATES_NOBG = ("{objs}", "a photo of {objs}", "a drawing of {objs}")
_TEMPLATES_COUNTED = (
    "{n} {generic} {bg}: {objs}", "there {be} {n} {generic} {bg}: {objs}",
    "a photo of {n} {generic} {bg}: {objs}",
)
_TEMPLATES_EMPTY = (
    "a photo of {stuffs}", "an empty scene with {stuffs}", "a picture of {stuffs} and nothing else",
)

# An object is mentioned in captions only if this much of it is visible.
_MENTION_MIN_AREA = 12
_MENTION_MIN_FRACTION = 0.35

# --------------------------------------------------------------------------------------------
# Configuration and scene description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """What the generator may produce. Subsets of categories/colours/stuff hold classes out."""

    min_size: int = 128
    max_size: int = 512
    square_prob: float = 0.5
    size_multiple: int = 1
    min_objects: int = 1
    max_objects: int = 5
    max_stuff_regions: int = 3
    texture_prob: float = 0.3
    color_jitter: float = 14.0  # max per-channel offset of an object's colour, in 0..255 units
    blur_prob: float = 0.3
    blur_strength: float = 1.2  # max Gaussian radius in pixels
    noise_prob: float = 0.5
    noise_strength: float = 0.035  # max noise sigma as a fraction of 255
    lighting_strength: float = 0.2  # brightness/contrast +-, colour cast +- half of it
    # Closer to what people draw (all off by default, so existing datasets stay bit-identical):
    plain_prob: float = 0.15  # chance that a scene allowed to have one is a plain backdrop alone
    plain_tones: bool = False  # plain backdrop of any paper tone (white..mid grey, cream, faint tints), not 3 fixed
    # how the paper's grey spreads with plain_tones: 255 - 75 * u ** power for uniform u; 1.5 keeps most paper near
    # white, 0.5 makes mid-grey paper common (white objects on grey paper, what plain drawings show)
    plain_tone_power: float = 1.5
    huge_prob: float = 0.0  # chance an object is drawn huge (radius 0.26-0.42 of the short side, up to ~55 % cover)
    hard_edge_prob: float = 0.0  # chance a scene's objects are drawn without anti-aliasing
    jpeg_prob: float = 0.0  # chance a scene is JPEG-compressed (quality 40-95)
    same_color_prob: float = 0.0  # chance that every object of a scene takes the first one's colour (only shapes differ)
    ground_color_prob: float = 0.0  # chance an object takes a colour close to the stuff under it (GROUND_LOOKALIKES)
    supersample: int = 3
    captions_per_image: int = 3
    categories: tuple[str, ...] = OBJECT_CATEGORIES
    colors: tuple[str, ...] = COLORS
    stuff: tuple[str, ...] = STUFF_CLASSES
    textures: tuple[str, ...] = TEXTURES
    sizes: tuple[str, ...] = SIZES

    def __post_init__(self) -> None:
        for name, allowed in (("categories", OBJECT_CATEGORIES), ("colors", COLORS),
                              ("stuff", STUFF_CLASSES), ("textures", TEXTURES), ("sizes", SIZES)):
            values = getattr(self, name)
            if isinstance(values, str):
                values = (values,)
            values = tuple(values)
            object.__setattr__(self, name, values)
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigError(f"WorldConfig.{name} has unknown entries {unknown}; "
                                  f"choose from {list(allowed)}.")
            if len(set(values)) != len(values):
                raise ConfigError(f"WorldConfig.{name} lists an entry twice: {list(values)}.")
            if not values and name != "textures":
                raise ConfigError(f"WorldConfig.{name} is empty; give at least one entry.")
        if not 16 <= self.min_size <= self.max_size:
            raise ConfigError("WorldConfig needs 16 <= min_size <= max_size "
                              f"(got {self.min_size}, {self.max_size}).")
        if not 0 <= self.min_objects <= self.max_objects or self.max_objects > 255:
            raise ConfigError("WorldConfig needs 0 <= min_objects <= max_objects <= 255 "
                              f"(got {self.min_objects}, {self.max_objects}).")
        if not 1 <= self.supersample <= 8:
            raise ConfigError(f"WorldConfig.supersample must be 1..8, got {self.supersample}.")
        if self.size_multiple < 1 or self.size_multiple > self.min_size:
            raise ConfigError(f"WorldConfig.size_multiple must be 1..min_size, got {self.size_multiple}.")
        if self.max_stuff_regions < 1 or self.captions_per_image < 0:
            raise ConfigError("WorldConfig needs max_stuff_regions >= 1 and captions_per_image >= 0.")
        if not self.plain_tone_power > 0:
            raise ConfigError(f"WorldConfig.plain_tone_power must be > 0, got {self.plain_tone_power}.")
        for name in ("square_prob", "texture_prob", "blur_prob", "noise_prob", "plain_prob", "huge_prob",
                     "hard_edge_prob", "jpeg_prob", "same_color_prob", "ground_color_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"WorldConfig.{name} must be a probability in [0, 1].")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class ObjectSpec:
    """One shape to draw: everything the renderer needs, in pixels/degrees."""

    category: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # circumscribed radius in pixels
    rotation: float = 0.0  # degrees, counter-clockwise
    texture: str | None = None
    texture_color: str | None = None
    rgb: tuple[float, float, float] | None = None  # defaults to COLOR_RGB[color]
    texture_rgb: tuple[float, float, float] | None = None
    texture_period: float = 8.0  # pixels
    texture_angle: float = 0.0  # degrees
    shading: tuple[float, float] = (0.0, 0.0)  # linear brightness gradient across the object
    shape_param: float = 0.5  # ring: inner/outer radius; crescent: offset of the cut circle


@dataclass
class StuffBand:
    """A horizontal background region. Its upper boundary (unused for the first band) is
    ``H * (top + slope * (x/W - 0.5) + amplitude * sin(2 pi frequency x/W + phase))``."""

    name: str
    top: float = 0.0
    slope: float = 0.0
    amplitude: float = 0.0
    frequency: float = 1.0
    phase: float = 0.0


@dataclass
class SceneSpec:
    """A full scene description; :func:`render_scene` turns it into a :class:`WorldSample`."""

    height: int
    width: int
    bands: list[StuffBand]
    objects: list[ObjectSpec] = field(default_factory=list)
    brightness: float = 1.0
    contrast: float = 1.0
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: float = 0.0
    noise: float = 0.0  # sigma in 0..255 units
    hard_edges: bool = False  # objects drawn without anti-aliasing
    jpeg_quality: int = 0  # > 0: the finished image is JPEG-compressed at this quality
    render_seed: int = 0  # randomness of textures (grass blades, clouds, bricks, noise)
    caption_seed: int = 0


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRecord:
    """An object as rendered. ``area`` counts visible pixels, ``full_area`` the pixels it would
    have without occlusion; ``bbox`` is (x0, y0, x1, y1), end-exclusive, of the visible pixels."""

    instance_id: int
    category: str
    color: str
    texture: str | None
    size: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    radius: float
    rotation: float
    area: int
    full_area: int
    on_stuff: str  # background class under the object's centre

    @property
    def visible(self) -> bool:
        return self.area > 0

    @property
    def mentionable(self) -> bool:
        """Visible enough for a caption to mention it."""
        return self.area >= max(_MENTION_MIN_AREA, _MENTION_MIN_FRACTION * self.full_area)

    @property
    def name(self) -> str:
        return f"{self.color} {self.category}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bbox"] = list(self.bbox)
        d["center"] = [round(float(c), 2) for c in self.center]
        d["radius"] = round(float(self.radius), 2)
        d["rotation"] = round(float(self.rotation), 2)
        return d


@dataclass(frozen=True)
class StuffRecord:
    """A background region: visible pixel ``area`` and ``full_area`` under the objects too."""

    name: str
    area: int
    full_area: int
    position: str  # "full", "top", "middle" or "bottom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class WorldSample:
    """One generated image with its label maps, records and captions."""

    image: np.ndarray
    category_map: np.ndarray
    instance_map: np.ndarray
    stuff_map: np.ndarray
    objects: list[ObjectRecord]
    stuff: list[StuffRecord]
    captions: list[str]
    config: WorldConfig
    seed: int | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def labels_stuff_and_category(self) -> np.ndarray:
        """Per-pixel stuff-or-category index into :data:`CATEGORY_MAP_NAMES`."""
        return self.category_map

    def to_record(self, stem: str) -> dict[str, Any]:
        """The ``captions.jsonl`` line of this sample."""
        return {"image": stem, "width": self.width, "height": self.height,
                "captions": list(self.captions), "objects": [o.to_dict() for o in self.objects],
                "stuff": [s.to_dict() for s in self.stuff]}


# --------------------------------------------------------------------------------------------
# Noise tiles and shapes (built once per process, fixed seed, so every process agrees)
# --------------------------------------------------------------------------------------------

_TILE = 1024


@lru_cache(maxsize=1)
def _tiles() -> dict[str, np.ndarray]:
    """Zero-mean unit-variance noise tiles: fine (white), smooth (blobs), streak (vertical)."""
    rng = np.random.default_rng(20240611)

    def upsample(h: int, w: int) -> np.ndarray:
        small = Image.fromarray(rng.standard_normal((h, w)).astype(np.float32))
        return np.asarray(small.resize((_TILE, _TILE), Image.BICUBIC), dtype=np.float32)

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - a.mean()) / (a.std() + 1e-6)).astype(np.float32)

    fine = norm(rng.standard_normal((_TILE, _TILE)).astype(np.float32))
    smooth = norm(upsample(12, 12) + 0.5 * upsample(32, 32) + 0.2 * upsample(96, 96))
    streak = norm(upsample(96, _TILE) + 0.4 * upsample(_TILE // 3, _TILE))
    return {"fine": fine, "smooth": smooth, "streak": streak}


def _crop(tile: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random h x w window of a tile (wrapping, with a seam, only beyond the tile's size)."""
    oy = int(rng.integers(0, max(_TILE - h, 0) + 1))
    ox = int(rng.integers(0, max(_TILE - w, 0) + 1))
    if h <= _TILE and w <= _TILE:
        return tile[oy:oy + h, ox:ox + w]
    rows = (np.arange(h) + oy) % _TILE
    cols = (np.arange(w) + ox) % _TILE
    return tile[rows[:, None], cols[None, :]]


def _white_noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(3, h, w) unit Gaussian noise: a contiguous random run of the white-noise tile."""
    flat = _tiles()["fine"].reshape(-1)
    n = h * w * 3
    if n <= flat.size:
        start = int(rng.integers(0, flat.size - n + 1))
        return flat[start:start + n].reshape(3, h, w)
    return np.resize(np.roll(flat, -int(rng.integers(0, flat.size))), (3, h, w))


def _normalised_polygon(points: np.ndarray) -> np.ndarray:
    """Centre a polygon on its bounding box and scale its farthest vertex to radius 1."""
    points = points - (points.min(0) + points.max(0)) / 2
    return (points / np.linalg.norm(points, axis=1).max()).astype(np.float64)


@lru_cache(maxsize=1)
def _polygons() -> dict[str, np.ndarray]:
    """Unit polygons (y down) of the polygonal categories."""
    def regular(n: int, start: float) -> np.ndarray:
        a = np.deg2rad(start) + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(a), -np.sin(a)], 1)

    star_a = np.deg2rad(90) + np.pi * np.arange(10) / 5
    star_r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    w = 0.32
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    return {
        "square": _normalised_polygon(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)),
        "triangle": regular(3, 90),
        "hexagon": regular(6, 0),
        "star": np.stack([star_r * np.cos(star_a), -star_r * np.sin(star_a)], 1),
        "cross": _normalised_polygon(np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
             [-1, w], [-1, -w], [-w, -w]], float)),
        "arrow": _normalised_polygon(np.array(
            [[-1, -0.24], [0.15, -0.24], [0.15, -0.62], [1, 0], [0.15, 0.62], [0.15, 0.24],
             [-1, 0.24]], float)),
        "heart": _normalised_polygon(heart),
    }


# --------------------------------------------------------------------------------------------
# Sampling a scene
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """A uniformly random element (cheaper than ``rng.choice`` for short tuples)."""
    return options[int(rng.random() * len(options))]


def _round_size(v: int, config: WorldConfig) -> int:
    m = config.size_multiple
    v = int(round(v / m)) * m
    lo = -(-config.min_size // m) * m
    hi = (config.max_size // m) * m
    return int(min(max(v, lo), max(hi, lo)))


def _sample_bands(rng: np.random.Generator, config: WorldConfig) -> list[StuffBand]:
    allowed = list(config.stuff)
    if "background" in allowed:  # a plain backdrop fills the frame alone, never shares it with stuff
        if rng.random() < config.plain_prob or allowed == ["background"]:
            return [StuffBand("background")]
        allowed.remove("background")
    k = int(rng.integers(1, min(3, config.max_stuff_regions, len(allowed)) + 1))
    if k == 1 or rng.random() < 0.15:
        return [StuffBand(_pick(rng, allowed))]
    names: list[str] = []
    if "sky" in allowed and rng.random() < 0.8:
        names.append("sky")
    ground = [s for s in allowed if s != "sky"]
    rng.shuffle(ground)
    names += ground[: k - len(names)]
    if len(names) == 1:
        return [StuffBand(names[0])]
    if len(names) == 2:
        tops = [rng.uniform(0.25, 0.7)]
    else:
        b1 = rng.uniform(0.2, 0.45)
        tops = [b1, rng.uniform(b1 + 0.2, 0.85)]
    bands = [StuffBand(names[0])]
    for name, top in zip(names[1:], tops):
        flat = name in ("water", "road") or rng.random() < 0.3
        bands.append(StuffBand(
            name, top=float(top), slope=float(rng.uniform(-0.12, 0.12)),
            amplitude=0.0 if flat else float(rng.uniform(0.005, 0.035)),
            frequency=float(rng.uniform(0.5, 3.5)), phase=float(rng.uniform(0, 2 * np.pi))))
    return bands


def _jittered_rgb(rng: np.random.Generator, color: str, amount: float) -> tuple[float, float, float]:
    """``COLOR_RGB[color]`` with each channel moved by up to ``amount`` (one draw of three uniforms)."""
    jitter = rng.uniform(-amount, amount, 3)
    return tuple(float(v) for v in np.clip(np.array(COLOR_RGB[color]) + jitter, 0, 255))


def _sample_object(rng: np.random.Generator, config: WorldConfig, h: int, w: int,
                   placed: list[ObjectSpec]) -> ObjectSpec:
    category = _pick(rng, config.categories)
    color = _pick(rng, config.colors)
    size = _pick(rng, config.sizes)
    lo, hi = SIZE_RANGES[size]
    radius = float(rng.uniform(lo, hi) * min(h, w))
    if config.huge_prob > 0 and rng.random() < config.huge_prob:
        radius = float(rng.uniform(0.26, 0.42) * min(h, w))
    # A few tries at a spot that does not bury (or get buried by) an earlier object.
    for _ in range(6):
        cx = float(rng.uniform(0.6 * radius, w - 0.6 * radius))
        cy = float(rng.uniform(0.6 * radius, h - 0.6 * radius))
        if all(math.hypot(cx - o.center[0], cy - o.center[1]) > 0.7 * max(o.radius, radius)
               for o in placed):
            break
    rotation = float(rng.uniform(-40, 40) if category == "heart" else rng.uniform(0, 360))
    rgb = _jittered_rgb(rng, color, config.color_jitter)
    texture = texture_color = texture_rgb = None
    if config.textures and rng.random() < config.texture_prob:
        texture = _pick(rng, config.textures)
        others = [c for c in config.colors if c != color]
        if others:
            texture_color = _pick(rng, others)
            base = np.array(COLOR_RGB[texture_color], float)
        else:  # a lighter/darker tone of the same colour: no new colour word enters the image
            base = np.array(rgb) * (0.45 if np.mean(rgb) > 128 else 1.0) + (
                0 if np.mean(rgb) > 128 else 110)
        texture_rgb = tuple(float(v) for v in np.clip(base + rng.uniform(-10, 10, 3), 0, 255))
    shape_param = {"ring": rng.uniform(0.45, 0.65), "crescent": rng.uniform(0.35, 0.55)}.get(
        category, 0.5)
    return ObjectSpec(
        category=category, color=color, size=size, center=(cx, cy), radius=radius,
        rotation=rotation, texture=texture, texture_color=texture_color, rgb=rgb,
        texture_rgb=texture_rgb, texture_period=float(max(4.0, radius * rng.uniform(0.3, 0.6))),
        texture_angle=float(rng.uniform(0, 180)),
        shading=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
        shape_param=float(shape_param))


def _ground_colored(rng: np.random.Generator, config: WorldConfig, obj: ObjectSpec, bands: list[StuffBand],
                    height: int) -> ObjectSpec:
    """``obj`` recoloured with a colour close to the band under its centre (kept when none is allowed)."""
    row = obj.center[1] / height
    ground = [b for b in bands if b is bands[0] or b.top <= row][-1].name
    options = [c for c in GROUND_LOOKALIKES[ground] if c in config.colors]
    if not options:
        return obj
    color = _pick(rng, options)
    rgb = _jittered_rgb(rng, color, config.color_jitter)
    if obj.texture_color == color:  # a texture in the object's own colour would not show
        return dataclasses.replace(obj, color=color, rgb=rgb, texture=None, texture_color=None, texture_rgb=None)
    return dataclasses.replace(obj, color=color, rgb=rgb)


def sample_scene(seed: int, config: WorldConfig = WorldConfig()) -> SceneSpec:
    """Draw a random scene description; deterministic in ``(seed, config)``."""
    rng = np.random.default_rng(seed)
    render_seed, caption_seed = (int(v) for v in rng.integers(0, 2**63 - 1, 2))
    if rng.random() < config.square_prob:
        h = w = _round_size(int(rng.integers(config.min_size, config.max_size + 1)), config)
    else:
        h = _round_size(int(rng.integers(config.min_size, config.max_size + 1)), config)
        w = _round_size(int(rng.integers(config.min_size, config.max_size + 1)), config)
    bands = _sample_bands(rng, config)
    objects: list[ObjectSpec] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        objects.append(_sample_object(rng, config, h, w, objects))
    if config.ground_color_prob > 0:
        objects = [_ground_colored(rng, config, o, bands, h) if rng.random() < config.ground_color_prob else o
                   for o in objects]
    if config.same_color_prob > 0 and len(objects) > 1 and rng.random() < config.same_color_prob:
        first = objects[0]
        objects = [first] + [dataclasses.replace(o, color=first.color, rgb=first.rgb) for o in objects[1:]]
    s = config.lighting_strength
    spec = SceneSpec(
        height=h, width=w, bands=bands, objects=objects,
        brightness=float(1 + rng.uniform(-s, s)), contrast=float(1 + rng.uniform(-s, s)),
        cast=tuple(float(v) for v in 1 + rng.uniform(-s / 2, s / 2, 3)),
        render_seed=render_seed, caption_seed=caption_seed)
    if rng.random() < config.blur_prob:
        spec.blur = float(rng.uniform(0.3, max(0.3, config.blur_strength)))
    if rng.random() < config.noise_prob:
        spec.noise = float(rng.uniform(1.0, max(1.0, config.noise_strength * 255)))
    if config.hard_edge_prob > 0 and rng.random() < config.hard_edge_prob:
        spec.hard_edges = True
    if config.jpeg_prob > 0 and rng.random() < config.jpeg_prob:
        spec.jpeg_quality = int(rng.integers(40, 96))
    return spec


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _mix(base: np.ndarray, *terms: tuple[np.ndarray, Sequence[float]]) -> np.ndarray:
    """Channel-first (3, h, w) image ``base[c] + sum(field * weights[c])``.

    Images are kept channel-first while rendering: per-channel 2-D numpy ops on contiguous
    planes are several times faster than broadcasting over a trailing axis of length 3."""
    h, w = terms[0][0].shape
    out = np.empty((3, h, w), np.float32)
    for c in range(3):
        plane = out[c]
        np.multiply(terms[0][0], np.float32(terms[0][1][c]), out=plane)
        for f, wts in terms[1:]:
            plane += f * np.float32(wts[c])
        plane += base[c]
    return out


def _stuff_texture(name: str, y0: int, y1: int, width: int, top: float, bottom: float,
                   rng: np.random.Generator, plain_tones: float = 0.0) -> np.ndarray:
    """Channel-first float32 (3, y1 - y0, width) appearance of a stuff class for rows y0..y1.
    ``top``/``bottom`` are the band's mean boundary rows (for gradients and lane marks); ``plain_tones`` > 0: a
    plain backdrop takes any paper tone, its grey spread by that power (0: three fixed papers)."""
    h = y1 - y0
    tiles = _tiles()
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    if name == "sky":
        t = np.clip((ys - top) / max(bottom - top, 1.0), 0, 1)
        c0, c1 = _jitter(rng, (70, 125, 215), 15), _jitter(rng, (170, 205, 240), 12)
        img = np.empty((3, h, width), np.float32)
        for c in range(3):
            img[c] = c0[c] + (c1[c] - c0[c]) * t
        if rng.random() < 0.6:
            d = _crop(tiles["smooth"], h, width, rng)
            a = np.clip((d - np.float32(rng.uniform(0.3, 1.3))) * np.float32(1.6), 0, 1)
            a *= np.float32(rng.uniform(0.6, 0.95))
            cloud = _jitter(rng, (245, 245, 248), 6)
            for c in range(3):
                img[c] += (cloud[c] - img[c]) * a
        return img
    if name == "grass":
        return _mix(_jitter(rng, (60, 140, 45), 15),
                    (_crop(tiles["streak"], h, width, rng), (12, 22, 8)),
                    (_crop(tiles["smooth"], h, width, rng), (8, 14, 6)))
    if name == "water":
        period_y = rng.uniform(6, 16)
        phase = ys * np.float32(2 * np.pi / period_y) + np.float32(rng.uniform(0.5, 2.5)) * np.sin(
            xs * np.float32(2 * np.pi / rng.uniform(30, 90)) + np.float32(rng.uniform(0, 6.3)))
        crest = np.clip((np.sin(phase) - np.float32(0.55)) * np.float32(2.5), 0, 1)
        return _mix(_jitter(rng, (35, 85, 165), 15), (crest, (45, 55, 50)),
                    (_crop(tiles["smooth"], h, width, rng), (5, 9, 12)))
    if name == "sand":
        fine = _crop(tiles["fine"], h, width, rng)
        speck = (fine > 2.1).astype(np.float32)
        return _mix(_jitter(rng, (215, 190, 140), 12), (fine, (8, 7, 6)), (speck, (-45, -45, -45)),
                    (_crop(tiles["smooth"], h, width, rng), (10, 9, 7)))
    if name == "wall":
        bh = float(rng.uniform(8, 20))
        bw = bh * float(rng.uniform(2.0, 3.0))
        mortar_w = max(1.0, 0.13 * bh)
        yrow = np.arange(y0, y1) + 0.5
        row = np.floor(yrow / bh).astype(np.int64)
        x = np.arange(width) + 0.5
        table = rng.standard_normal((32, 32)).astype(np.float32) * np.float32(14)
        shade = np.empty((h, width), np.float32)
        mortar = np.empty((h, width), bool)
        for parity in (0, 1):  # odd brick rows are shifted by half a brick
            rows = np.flatnonzero(row % 2 == parity)
            u = x + parity * bw / 2
            col = np.floor(u / bw).astype(np.int64) % 32
            shade[rows] = table[(row[rows] % 32)[:, None], col[None, :]]
            mortar[rows] = ((u % bw) < mortar_w)[None, :]
        mortar |= ((yrow % bh) < mortar_w)[:, None]
        shade += _crop(tiles["fine"], h, width, rng) * np.float32(5)
        img = _mix(_jitter(rng, (155, 70, 50), 18), (shade, (1.0, 0.6, 0.45)))
        mortar_rgb = _jitter(rng, (195, 190, 180), 10)
        for c in range(3):
            img[c][mortar] = mortar_rgb[c]
        return img
    if name == "background":
        r = rng.random()
        base = (248, 248, 246) if r < 0.6 else (215, 215, 212) if r < 0.8 else (240, 232, 205)
        if plain_tones:  # any paper: white to mid grey, cream, or a faint tint
            grey = 255.0 - 75.0 * rng.random() ** plain_tones
            tint = rng.uniform(-1, 1, 3) * (12.0 if rng.random() < 0.3 else 3.0)
            if rng.random() < 0.25:
                tint += (6.0, 2.0, -22.0)  # cream
            base = tuple(float(v) for v in np.clip(grey + tint, 0, 255))
        return _mix(_jitter(rng, base, 6), (_crop(tiles["smooth"], h, width, rng), (2, 2, 2)))
    if name == "road":
        g = float(rng.uniform(70, 110))
        img = _mix(np.float32([g, g, g + 4]), (_crop(tiles["fine"], h, width, rng), (7, 7, 7)),
                   (_crop(tiles["smooth"], h, width, rng), (6, 6, 6)))
        band_h = bottom - top
        if band_h >= 20:
            yc = top + band_h * rng.uniform(0.35, 0.65)
            lw = max(2.0, 0.04 * band_h)
            period = rng.uniform(30, 70)
            r0 = int(np.clip(math.ceil(yc - lw / 2 - 0.5), y0, y1))
            r1 = int(np.clip(math.ceil(yc + lw / 2 - 0.5), y0, y1))
            if r1 > r0:
                dash = ((xs[0] + np.float32(rng.uniform(0, period))) % np.float32(period)) < 0.5 * period
                lane = _jitter(rng, (235, 235, 230) if rng.random() < 0.6 else (235, 200, 45), 8)
                for c in range(3):
                    img[c, r0 - y0:r1 - y0, dash] = lane[c]
        return img
    raise ConfigError(f"Unknown stuff class {name!r}; choose from {list(STUFF_CLASSES)}.")


def _render_background(spec: SceneSpec, rng: np.random.Generator,
                       plain_tones: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased channel-first background (3, H, W) float32 and stuff map (STUFF_CLASSES ids)."""
    h, w = spec.height, spec.width
    xs = np.arange(w, dtype=np.float64) + 0.5
    bounds = [np.zeros(w)]
    for band in spec.bands[1:]:
        b = h * (band.top + band.slope * (xs / w - 0.5)
                 + band.amplitude * np.sin(2 * np.pi * band.frequency * xs / w + band.phase))
        bounds.append(np.maximum(b, bounds[-1] + 1.0))
    bounds.append(np.full(w, float(h)))
    image = np.zeros((3, h, w), np.float32)
    stuff_map = np.zeros((h, w), np.uint8)
    for i, band in enumerate(spec.bands):
        top, bottom = bounds[i], bounds[i + 1]
        y0 = int(np.clip(np.floor(top.min()), 0, h)) if i else 0
        y1 = int(np.clip(np.ceil(bottom.max()), y0, h))
        if y1 <= y0:
            continue
        tex = _stuff_texture(band.name, y0, y1, w, float(top.mean()), float(bottom.mean()), rng, plain_tones)
        sid = STUFF_CLASSES.index(band.name)
        # Rows wholly below the boundary are copied; only the transition rows are blended.
        y_full = int(np.clip(np.ceil(top.max()), y0, y1)) if i else y0
        image[:, y_full:y1] = tex[:, y_full - y0:]
        stuff_map[y_full:y1] = sid
        if y_full > y0:
            ys = np.arange(y0, y_full, dtype=np.float64)[:, None]
            cover = np.clip(ys + 1.0 - top[None, :], 0, 1).astype(np.float32)
            for c in range(3):
                plane = image[c, y0:y_full]
                plane += (tex[c, :y_full - y0] - plane) * cover
            stuff_map[y0:y_full][ys + 0.5 >= top[None, :]] = sid
    return image, stuff_map


def _object_coverage(obj: ObjectSpec, x0: int, y0: int, bw: int, bh: int, s: int) -> np.ndarray:
    """Fraction (0..1 float32) of each pixel of the box covered by the shape, via supersampling."""
    mask = Image.new("L", (bw * s, bh * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = (obj.center[0] - x0) * s - 0.5, (obj.center[1] - y0) * s - 0.5
    r = obj.radius * s

    def disc(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if obj.category == "circle":
        disc(cx, cy, r, 255)
    elif obj.category == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, r * obj.shape_param, 0)
    elif obj.category == "crescent":
        a = math.radians(obj.rotation)
        d = r * obj.shape_param
        disc(cx, cy, r, 255)
        disc(cx + d * math.cos(a), cy - d * math.sin(a), r * 0.9, 0)
    else:
        a = math.radians(obj.rotation)
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        pts = _polygons()[obj.category] @ rot * r + (cx, cy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    if s > 1:
        mask = mask.reduce(s)
    return np.asarray(mask, dtype=np.float32) * np.float32(1 / 255)


def _texture_alpha(obj: ObjectSpec, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Anti-aliased (analytic, 1-pixel ramp) coverage of the texture's second colour at pixel
    offsets (dx, dy) from the object's centre."""
    a = math.radians(obj.texture_angle)
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    p = obj.texture_period

    def tri(t: np.ndarray) -> np.ndarray:  # signed distance (pixels) to a 50% stripe's edge
        return p * (0.25 - np.abs((t / p + 0.25) % 1.0 - 0.5))

    if obj.texture == "striped":
        sd = tri(u)
    elif obj.texture == "checkered":
        su, sv = tri(u), tri(v)
        sd = np.sign(su * sv) * np.minimum(np.abs(su), np.abs(sv))
    elif obj.texture == "dotted":
        fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        sd = 0.3 * p - p * np.sqrt(fu * fu + fv * fv)
    else:
        raise ConfigError(f"Unknown texture {obj.texture!r}; choose from {list(TEXTURES)}.")
    return np.clip(sd + 0.5, 0, 1).astype(np.float32)


def _object_box(obj: ObjectSpec, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), clipped to the image, that contains the whole shape."""
    ext = obj.radius * 1.02 + 1
    cx, cy = obj.center
    return (max(0, int(math.floor(cx - ext))), max(0, int(math.floor(cy - ext))),
            min(w, int(math.ceil(cx + ext))), min(h, int(math.ceil(cy + ext))))


def render_scene(spec: SceneSpec, config: WorldConfig = WorldConfig(),
                 seed: int | None = None) -> WorldSample:
    """Render a scene description: image, label maps, records and captions."""
    h, w = spec.height, spec.width
    rng = np.random.default_rng(spec.render_seed)
    tones = config.plain_tone_power if config.plain_tones else 0.0
    image, stuff_map = _render_background(spec, rng, tones)  # channel-first while rendering
    category_map = stuff_map.copy()
    instance_map = np.zeros((h, w), np.uint8 if len(spec.objects) < 256 else np.uint16)
    s = 1 if spec.hard_edges else config.supersample
    full_areas: list[int] = []
    for k, obj in enumerate(spec.objects, start=1):
        if obj.category not in OBJECT_CATEGORIES or obj.color not in COLOR_RGB:
            raise ConfigError(f"Unknown object {obj.color!r} {obj.category!r}; choose from "
                              f"{list(COLORS)} x {list(OBJECT_CATEGORIES)}.")
        x0, y0, x1, y1 = _object_box(obj, h, w)
        if x1 <= x0 or y1 <= y0:
            full_areas.append(0)
            continue
        cov = _object_coverage(obj, x0, y0, x1 - x0, y1 - y0, s)
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - obj.center[0])
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - obj.center[1])
        inv_r = np.float32(1.0 / max(obj.radius, 1.0))
        shade = 1.0 + (np.float32(obj.shading[0]) * xs + np.float32(obj.shading[1]) * ys) * inv_r
        rgb = obj.rgb if obj.rgb is not None else COLOR_RGB[obj.color]
        t = None
        if obj.texture is not None:
            trgb = obj.texture_rgb if obj.texture_rgb is not None else COLOR_RGB[obj.texture_color or "white"]
            t = _texture_alpha(obj, xs, ys)
        for c in range(3):
            col = shade * np.float32(rgb[c]) if t is None else shade * (
                np.float32(rgb[c]) + np.float32(trgb[c] - rgb[c]) * t)
            plane = image[c, y0:y1, x0:x1]
            plane += (col - plane) * cov
        inside = cov >= 0.5
        full_areas.append(int(np.count_nonzero(inside)))
        category_map[y0:y1, x0:x1][inside] = len(STUFF_CLASSES) + OBJECT_CATEGORIES.index(obj.category)
        instance_map[y0:y1, x0:x1][inside] = k

    # Global lighting (one affine map per channel), blur, sensor noise.
    cast = np.asarray(spec.cast, np.float32)
    mean = image[:, ::4, ::4].mean(axis=(1, 2))
    gain = np.float32(spec.contrast * spec.brightness) * cast
    offset = np.float32((1 - spec.contrast) * spec.brightness) * mean * cast
    image *= gain[:, None, None]
    image += offset[:, None, None]
    if spec.blur > 0:
        np.clip(image, 0, 255, out=image)
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0)).astype(np.uint8)
        blurred = Image.fromarray(hwc).filter(ImageFilter.GaussianBlur(spec.blur))
        image = np.asarray(blurred, dtype=np.float32).transpose(2, 0, 1)
    if spec.noise > 0:
        image = image + _white_noise(h, w, rng) * np.float32(spec.noise)
    np.clip(image, 0, 255, out=image)
    out = np.empty((h, w, 3), np.uint8)
    np.copyto(out, image.transpose(1, 2, 0), casting="unsafe")
    if spec.jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=spec.jpeg_quality)
        out = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    objects = _object_records(spec, instance_map, stuff_map, full_areas)
    stuff = _stuff_records(spec, category_map, stuff_map)
    captions = make_captions(objects, stuff, np.random.default_rng(spec.caption_seed),
                             config.captions_per_image)
    return WorldSample(image=out, category_map=category_map, instance_map=instance_map,
                       stuff_map=stuff_map, objects=objects, stuff=stuff, captions=captions,
                       config=config, seed=seed)


def _object_records(spec: SceneSpec, instance_map: np.ndarray, stuff_map: np.ndarray,
                    full_areas: list[int]) -> list[ObjectRecord]:
    records = []
    h, w = instance_map.shape
    for k, obj in enumerate(spec.objects, start=1):
        x0, y0, x1, y1 = _object_box(obj, h, w)
        sub = instance_map[y0:y1, x0:x1] == k
        area = int(np.count_nonzero(sub))
        bbox = (0, 0, 0, 0)
        if area:
            rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
            bbox = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
        cy = min(max(int(obj.center[1]), 0), h - 1)
        cx = min(max(int(obj.center[0]), 0), w - 1)
        records.append(ObjectRecord(
            instance_id=k, category=obj.category, color=obj.color, texture=obj.texture,
            size=obj.size, bbox=bbox, center=(float(obj.center[0]), float(obj.center[1])),
            radius=float(obj.radius), rotation=float(obj.rotation), area=area,
            full_area=full_areas[k - 1], on_stuff=STUFF_CLASSES[int(stuff_map[cy, cx])]))
    return records


def _stuff_records(spec: SceneSpec, category_map: np.ndarray,
                   stuff_map: np.ndarray) -> list[StuffRecord]:
    n = len(spec.bands)
    records: list[StuffRecord] = []
    for i, band in enumerate(spec.bands):
        if any(r.name == band.name for r in records):
            continue
        sid = STUFF_CLASSES.index(band.name)
        full = int(np.count_nonzero(stuff_map == sid))
        if full:
            pos = "full" if n == 1 else ("top" if i == 0 else "bottom" if i == n - 1 else "middle")
            records.append(StuffRecord(band.name, int(np.count_nonzero(category_map == sid)), full, pos))
    return records


def sample_seed(dataset_seed: int, index: int) -> int:
    """Seed of item ``index`` of a dataset with seed ``dataset_seed`` (disjoint across seeds)."""
    if not 0 <= index < 2**32 or dataset_seed < 0:
        raise ValueError("need dataset_seed >= 0 and 0 <= index < 2**32")
    return (int(dataset_seed) << 32) | int(index)


def generate_sample(seed: int, config: WorldConfig = WorldConfig()) -> WorldSample:
    """Generate one sample; identical output for identical ``(seed, config)``."""
    return render_scene(sample_scene(seed, config), config, seed=seed)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _object_phrases(objs: list[ObjectRecord], rng: np.random.Generator) -> tuple[list[str], int]:
    """Noun phrases for objects (identical descriptions grouped: "two red circles")."""
    omit_colors = rng.random() < 0.08
    nouns = {c: _pick(rng, CATEGORY_SYNONYMS[c]) for c in dict.fromkeys(o.category for o in objs)}
    groups: dict[tuple, int] = {}
    for o in objs:
        size = _pick(rng, SIZE_SYNONYMS[o.size]) if rng.random() < 0.3 else None
        texture = (_pick(rng, TEXTURE_SYNONYMS[o.texture])
                   if o.texture is not None and rng.random() < 0.8 else None)
        color = None if omit_colors or rng.random() < 0.05 else o.color
        key = (size, texture, color, o.category)
        groups[key] = groups.get(key, 0) + 1
    phrases = []
    for (size, texture, color, category), count in groups.items():
        words = [w for w in (size, texture, color) if w]
        noun = nouns[category]
        if count == 1:
            words.append(noun)
            phrases.append(_article(words[0]) + " " + " ".join(words))
        else:
            phrases.append(" ".join([_NUMBER_NAMES.get(count, str(count))] + words + [PLURALS[noun]]))
    order = rng.permutation(len(phrases))
    return [phrases[i] for i in order], len(objs)


def _background_phrases(objs: list[ObjectRecord], stuff: list[StuffRecord],
                        rng: np.random.Generator) -> tuple[str, str]:
    """("on grass under the sky", "grass and the sky") for the visible stuff."""
    names = [s.name for s in sorted(stuff, key=lambda s: -s.area)]
    votes = [o.on_stuff for o in objs if o.on_stuff in names]
    primary = max(names, key=lambda n: (votes.count(n), -names.index(n))) if votes else names[0]
    bg = _pick(rng, _STUFF_PLACE[primary])
    others = [n for n in names if n != primary]
    if others and rng.random() < 0.5:
        other = "sky" if "sky" in others else others[0]
        if other == "sky":
            bg += " " + _pick(rng, _SKY_SECONDARY)
        else:
            bg += " " + _pick(rng, _SECONDARY).format(noun=_pick(rng, _STUFF_NOUN[other]))
    listed = names if rng.random() < 0.6 else names[:1]
    stuffs = _join([_pick(rng, _STUFF_NOUN[n]) for n in listed])
    return bg, stuffs


def _one_caption(objects: list[ObjectRecord], stuff: list[StuffRecord],
                 rng: np.random.Generator) -> str:
    visible = [o for o in objects if o.visible]
    chosen = [o for o in objects if o.mentionable]
    total = sum(x.area for x in stuff)
    stuff = [s for s in stuff if s.area > 0 and s.area >= 0.01 * total]
    if len(chosen) > 1 and rng.random() < 0.3:  # sometimes small things go unmentioned
        big = [o for o in chosen if o.size != "small"]
        chosen = big or chosen
    if len(chosen) > 1 and rng.random() < 0.15:  # sometimes only the most visible one
        chosen = [max(chosen, key=lambda o: o.area)]
    if not chosen:
        if not stuff:  # objects cover everything, yet none is visible enough to name
            return "a photo of shapes"
        _, stuffs = _background_phrases([], stuff, rng)
        # "empty"/"nothing else" only when truly no object is visible.
        return _pick(rng, _TEMPLATES_EMPTY if not visible else _TEMPLATES_EMPTY[:1]).format(
            stuffs=stuffs)
    phrases, n = _object_phrases(chosen, rng)
    objs = _join(phrases)
    if not stuff:
        return _pick(rng, _TEMPLATES_NOBG).format(objs=objs)
    bg, stuffs = _background_phrases(chosen, stuff, rng)
    be = "is" if phrases[0].startswith(("a ", "an ")) else "are"  # agrees with the first item
    roll = rng.random()
    if len(chosen) == len(visible) and roll < 0.25:
        generic = _pick(rng, GENERIC_OBJECT_WORDS)
        return _pick(rng, _TEMPLATES_COUNTED).format(
            n=_NUMBER_NAMES.get(n, str(n)), generic=PLURALS[generic] if n > 1 else generic,
            bg=bg, objs=objs, be="are" if n > 1 else "is")
    if roll > 0.88:
        return _pick(rng, _TEMPLATES_NOBG).format(objs=objs)
    return _pick(rng, _TEMPLATES_BG).format(objs=objs, bg=bg, stuffs=stuffs, be=be)


def make_captions(objects: list[ObjectRecord], stuff: list[StuffRecord],
                  rng: np.random.Generator, count: int = 3) -> list[str]:
    """Up to ``count`` different captions that only state true things about the scene."""
    captions: list[str] = []
    for _ in range(count * 8):
        if len(captions) >= count:
            break
        c = _one_caption(objects, stuff, rng)
        if c not in captions:
            captions.append(c)
    return captions


# --------------------------------------------------------------------------------------------
# Parsing captions and class names against the synonym tables
# --------------------------------------------------------------------------------------------


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str, bool]]:
    table: dict[tuple[str, ...], tuple[str, str, bool]] = {}
    for cat, syns in CATEGORY_SYNONYMS.items():
        for s in syns:
            table[tuple(s.split())] = ("category", cat, False)
            table[tuple(PLURALS[s].split())] = ("category", cat, True)
    for g in GENERIC_OBJECT_WORDS:
        table[(g,)] = ("generic", g, False)
        table[(PLURALS[g],)] = ("generic", g, True)
    for kind, tab in (("stuff", STUFF_SYNONYMS), ("color", COLOR_SYNONYMS),
                      ("texture", TEXTURE_SYNONYMS), ("size", SIZE_SYNONYMS)):
        for canon, syns in tab.items():
            for s in syns:
                table[tuple(s.split())] = (kind, canon, False)
    for word, n in COUNT_WORDS.items():
        table[(word,)] = ("count", str(n), n > 1)
    table[("a",)] = table[("an",)] = ("count", "1", False)
    return table


_PHRASES = _phrase_table()
_TOKEN = re.compile(r"[a-z0-9]+")


def _items(text: str) -> list[tuple[str, str, bool]]:
    """Tokens of ``text`` grouped into known phrases (longest match); unknown -> ("other", w)."""
    toks = _TOKEN.findall(text.lower())
    out, i = [], 0
    while i < len(toks):
        for n in (2, 1):
            hit = _PHRASES.get(tuple(toks[i:i + n])) if i + n <= len(toks) else None
            if hit is not None:
                out.append(hit)
                i += n
                break
        else:
            tok = toks[i]
            out.append(("count", str(int(tok)), int(tok) > 1) if tok.isdigit() else ("other", tok, False))
            i += 1
    return out


@dataclass(frozen=True)
class Mention:
    """An object mention found in a caption: category None means "shape(s)"/"object(s)"."""

    category: str | None
    color: str | None = None
    texture: str | None = None
    size: str | None = None
    count: int | None = None


def parse_caption(caption: str) -> tuple[list[Mention], list[str]]:
    """Object mentions and stuff classes named in a caption (via the synonym tables)."""
    items = _items(caption)
    mentions: list[Mention] = []
    stuff: list[str] = []
    for i, (kind, canon, _plural) in enumerate(items):
        if kind == "stuff":
            stuff.append(canon)
        if kind not in ("category", "generic"):
            continue
        mods: dict[str, str] = {}
        j = i - 1
        while j >= 0 and items[j][0] in ("color", "texture", "size", "count") and items[j][0] not in mods:
            mods[items[j][0]] = items[j][1]
            j -= 1
        mentions.append(Mention(
            category=canon if kind == "category" else None, color=mods.get("color"),
            texture=mods.get("texture"), size=mods.get("size"),
            count=int(mods["count"]) if "count" in mods else None))
    return mentions, stuff


def caption_words() -> frozenset[str]:
    """Every word a caption can contain (templates plus synonym tables)."""
    words: set[str] = set()
    texts = list(_TEMPLATES_BG + _TEMPLATES_NOBG + _TEMPLATES_COUNTED + _TEMPLATES_EMPTY
                 + _SECONDARY + _SKY_SECONDARY)
    for tab in (_STUFF_PLACE, _STUFF_NOUN):
        texts += [p for ps in tab.values() for p in ps]
    texts += [" ".join(k) for k in _PHRASES] + ["is are"]
    for t in texts:
        words.update(_TOKEN.findall(re.sub(r"\{[a-z]+\}", " ", t)))
    return frozenset(words)


@dataclass(frozen=True)
class NameQuery:
    """A class name parsed into constraints; ``specificity`` = number of constraints."""

    name: str
    stuff: str | None = None
    category: str | None = None
    color: str | None = None
    texture: str | None = None
    size: str | None = None

    @property
    def specificity(self) -> int:
        return sum(v is not None for v in (self.category, self.color, self.texture, self.size))

    def matches(self, obj: ObjectRecord) -> bool:
        return (self.stuff is None and (self.category in (None, obj.category))
                and self.color in (None, obj.color) and self.texture in (None, obj.texture)
                and self.size in (None, obj.size))


def parse_class_name(name: str) -> NameQuery | None:
    """Parse "red circle", "striped box", "lawn", "shape", "red" (any red object)...;
    None if the name uses words outside the synonym tables."""
    items = [it for it in _items(name) if not (it[0] == "count" and it[1] == "1")
             and not (it[0] == "other" and it[1] == "the")]
    if not items:
        return None
    head_kind, head, _ = items[-1]
    if head_kind == "stuff":
        return NameQuery(name, stuff=head) if len(items) == 1 else None
    if head_kind in ("category", "generic"):
        items = items[:-1]
    mods: dict[str, str] = {}
    for kind, canon, _ in items:
        if kind not in ("color", "texture", "size") or kind in mods:
            return None
        mods[kind] = canon
    if head_kind not in ("category", "generic") and not mods:
        return None
    return NameQuery(name, category=head if head_kind == "category" else None, **mods)


# --------------------------------------------------------------------------------------------
# Class schemes
# --------------------------------------------------------------------------------------------

Scheme = Union[str, Sequence[str]]


def class_names(scheme: Scheme, config: WorldConfig = WorldConfig()) -> list[str]:
    """Class list of a scheme: "category" = stuff + categories; "color_category" = stuff +
    "<colour> <category>" (colour-major); a sequence of names is used as given."""
    if isinstance(scheme, str):
        if scheme in ("category", "stuff_and_category"):
            return list(config.stuff) + list(config.categories)
        if scheme == "color_category":
            return list(config.stuff) + [f"{c} {k}" for c in config.colors for k in config.categories]
        raise VocabularyError(f"Unknown scheme {scheme!r}; use 'category', 'color_category' "
                              "or a list of class names.")
    names = [str(n) for n in scheme]
    if not names:
        raise VocabularyError("The class-name list is empty; give at least one name.")
    return names


class WorldVocabulary:
    """A class list for the generated world and how world pixels map onto it.

    Stuff pixels get the name of their stuff class (synonyms allowed); object pixels get the
    most specific matching name ("red circle" beats "circle" beats "shape"; ties: first listed).
    Pixels no name claims get ``ignore_index`` (255, or 65535 beyond 255 classes)."""

    def __init__(self, names: Sequence[str], strict: bool = True) -> None:
        self.names = list(names)
        if not self.names:
            raise VocabularyError("The class-name list is empty; give at least one name.")
        self.queries = [parse_class_name(n) for n in self.names]
        bad = [n for n, q in zip(self.names, self.queries) if q is None]
        if bad and strict:
            raise VocabularyError(f"Class names {bad} use words outside the world's synonym "
                                  "tables; pass strict=False to let them match nothing.")
        self.ignore_index = IGNORE_INDEX if len(self.names) <= 255 else IGNORE_INDEX_16
        self.dtype = np.uint8 if len(self.names) <= 255 else np.uint16
        self._stuff_lut = np.full(len(CATEGORY_MAP_NAMES), self.ignore_index, np.int64)
        for sid, sname in enumerate(STUFF_CLASSES):
            for i, q in enumerate(self.queries):
                if q is not None and q.stuff == sname:
                    self._stuff_lut[sid] = i
                    break

    @classmethod
    def from_scheme(cls, scheme: Scheme, config: WorldConfig = WorldConfig(),
                    strict: bool = True) -> "WorldVocabulary":
        """Vocabulary of a named scheme or explicit name list (see :func:`class_names`)."""
        return cls(class_names(scheme, config), strict=strict)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def object_class(self, obj: ObjectRecord) -> int:
        """Index of the most specific name matching the object, or ``ignore_index``."""
        best, best_spec = self.ignore_index, -1
        for i, q in enumerate(self.queries):
            if q is not None and q.matches(obj) and q.specificity > best_spec:
                best, best_spec = i, q.specificity
        return best

    def label_map(self, sample: WorldSample) -> np.ndarray:
        """H x W int64 class indices of a sample."""
        obj_lut = np.full(len(sample.objects) + 1, self.ignore_index, np.int64)
        for o in sample.objects:
            obj_lut[o.instance_id] = self.object_class(o)
        stuff_part = self._stuff_lut[sample.category_map]
        return np.where(sample.instance_map > 0, obj_lut[sample.instance_map], stuff_part)


def semantic_map(sample: WorldSample, scheme: Scheme = "category", strict: bool = True) -> np.ndarray:
    """Per-pixel class indices of ``sample`` under a scheme (see :func:`class_names`)."""
    return WorldVocabulary.from_scheme(scheme, sample.config, strict=strict).label_map(sample)


# --------------------------------------------------------------------------------------------
# Dataset and writing
# --------------------------------------------------------------------------------------------


class WorldDataset:
    """Map-style dataset of generated samples: item i is ``generate_sample(sample_seed(seed, i))``."""

    def __init__(self, num_samples: int, seed: int = 0, config: WorldConfig = WorldConfig(),
                 scheme: Scheme = "category", strict: bool = True) -> None:
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}.")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.config = config
        self.vocabulary = WorldVocabulary.from_scheme(scheme, config, strict=strict)
        self.class_names = self.vocabulary.names

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> WorldSample:
        """The full :class:`WorldSample` behind item ``index``."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= max(self.num_samples, 1)
        return generate_sample(sample_seed(self.seed, index), self.config)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.sample(index)
        return {"image": s.image, "label": self.vocabulary.label_map(s), "captions": s.captions,
                "index": int(index) % self.num_samples}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_save_png(path: Path, array: np.ndarray, compress_level: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
    os.replace(tmp, path)


def _complete(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


@lru_cache(maxsize=4)
def _cached_vocabulary(names: tuple[str, ...], strict: bool) -> WorldVocabulary:
    return WorldVocabulary(names, strict=strict)


def _write_item(job: tuple) -> dict[str, Any]:
    """Generate item ``index`` and write whichever of its image/label files are missing."""
    out_dir, index, seed, config, names, strict = job
    stem = f"world_{index:06d}"
    img_path, lab_path = out_dir / "images" / f"{stem}.png", out_dir / "labels" / f"{stem}.png"
    sample = generate_sample(sample_seed(seed, index), config)
    written = 0
    if not _complete(img_path):
        _atomic_save_png(img_path, sample.image, 1)
        written += 1
    if not _complete(lab_path):
        vocab = _cached_vocabulary(tuple(names), strict)
        _atomic_save_png(lab_path, vocab.label_map(sample).astype(vocab.dtype), 6)
        written += 1
    rec = sample.to_record(stem)
    rec["_written"] = written
    return rec


def write_dataset(out_dir: str | os.PathLike, num_samples: int, seed: int = 0,
                  config: WorldConfig = WorldConfig(), scheme: Scheme = "color_category",
                  num_workers: int = 0, strict: bool = True) -> dict[str, Any]:
    """Write samples in the custom-dataset layout, resumably.

    ``images/{stem}.png`` (RGB), ``labels/{stem}.png`` (class indices; 8-bit, 255 = ignore, or
    16-bit with 65535 = ignore beyond 255 classes), ``classes.txt``, ``captions.jsonl`` and a
    ``world.json`` manifest. Every file is written to a temporary name and renamed, existing
    files are kept, and a folder made with another seed/config/scheme is refused."""
    out = Path(out_dir)
    names = class_names(scheme, config)
    WorldVocabulary(names, strict=strict)  # validate before touching the disk
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels", "."):
        for p in (out / sub).iterdir():
            if _TMP_RE.match(p.name):
                p.unlink(missing_ok=True)

    manifest = {"generator": "vocabseg.data.world", "format": 1, "seed": int(seed),
                "scheme": scheme if isinstance(scheme, str) else list(names),
                "config": config.to_dict()}
    man_path = out / "world.json"
    if man_path.exists():
        old = json.loads(man_path.read_text())
        old.pop("num_samples", None)
        if old != manifest:
            raise DatasetError(f"{out} holds a world dataset made with another seed, config or "
                               "scheme; write to a new folder or delete the old one.")
    classes_text = "".join(n + "\n" for n in names)
    cls_path = out / "classes.txt"
    if cls_path.exists() and cls_path.read_text() != classes_text:
        raise DatasetError(f"{cls_path} lists other classes; write to a new folder.")

    cap_path = out / "captions.jsonl"
    records: dict[str, dict[str, Any]] = {}
    if cap_path.exists():
        for line in cap_path.read_text().splitlines():
            try:
                rec = json.loads(line)
                records[rec["image"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    jobs = []
    for i in range(num_samples):
        stem = f"world_{i:06d}"
        if (stem not in records or not _complete(out / "images" / f"{stem}.png")
                or not _complete(out / "labels" / f"{stem}.png")):
            jobs.append((out, i, int(seed), config, names, strict))
    written = 0
    if num_workers > 0 and len(jobs) > 1:
        # fork: workers need no re-import of __main__ and only run numpy/PIL code.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(num_workers, mp_context=get_context(method)) as ex:
            results = list(ex.map(_write_item, jobs, chunksize=max(1, len(jobs) // (8 * num_workers))))
    else:
        results = [_write_item(j) for j in jobs]
    for rec in results:
        written += rec.pop("_written")
        records[rec["image"]] = rec

    cap_text = "".join(json.dumps(records[k], separators=(",", ":")) + "\n"
                       for k in sorted(records, key=lambda k: (len(k), k)))
    for path, text in ((cls_path, classes_text), (cap_path, cap_text),
                       (man_path, json.dumps({**manifest, "num_samples": max(
                           num_samples, len(records))}, indent=1) + "\n")):
        if not path.exists() or path.read_text() != text:
            _atomic_write_bytes(path, text.encode())
            written += 1
    return {"out_dir": str(out), "num_samples": num_samples, "generated": len(jobs),
            "files_written": written, "num_classes": len(names)}
