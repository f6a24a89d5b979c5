"""Distinct colours for class indices: the palette that label PNGs and overlays share.

Its own module so that :mod:`vocabseg.io` (palette PNGs) and :mod:`vocabseg.viz` (overlays) both use it without
importing each other.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["make_palette"]

_MAX_COLOURS = 256**3 - 1  # every RGB colour except black, which marks ignored pixels


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert [N,3] sRGB values in 0..255 to CIELAB (D65), where distances track perceived difference."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = lin @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=32)
def _greedy_palette(seed: int, limit: int = 1 << 30) -> np.ndarray:
    """Grid colours (except near-black) ordered by farthest-point search in CIELAB; the search stops after
    ``limit`` colours (the order is greedy, so a shorter palette is a prefix of the full one: a 3-name
    vocabulary costs 3 steps, not ~3,800)."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(0, 255, 16)  # grid step 17
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    grid = np.clip(np.rint(grid + rng.uniform(-6, 6, size=grid.shape)), 0, 255)  # seed varies the palette
    lab = _srgb_to_lab(grid)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    # Mid-lightness, saturated colours stand out on photos; very dark/light or grey ones do not.
    vivid = (lab[:, 0] >= 40) & (lab[:, 0] <= 90) & (chroma >= 30)
    # Vivid colours first, then the rest of the grid (except near-black) once those run out.
    groups = [np.flatnonzero(vivid), np.flatnonzero(~vivid & (lab[:, 0] >= 15))]
    chosen: list[int] = []
    for idx in groups:
        cand = lab[idx]
        dist = np.full(len(idx), np.inf)
        for c in chosen:
            dist = np.minimum(dist, np.linalg.norm(cand - lab[c], axis=1))
        j = int(np.argmax(chroma[idx])) if not chosen else int(np.argmax(dist))
        for _ in range(len(idx)):
            if len(chosen) >= limit:
                break
            chosen.append(int(idx[j]))
            dist = np.minimum(dist, np.linalg.norm(cand - cand[j], axis=1))
            dist[j] = -np.inf
            j = int(np.argmax(dist))
    pal = grid[chosen].astype(np.uint8)
    pal.setflags(write=False)
    return pal


def make_palette(n: int, seed: int = 0) -> np.ndarray:
    """Return ``n`` distinct RGB colours as an [n, 3] uint8 array, the same for the same ``(n, seed)``.

    Colours are picked one by one as far as possible (in CIELAB) from those already picked, among
    saturated mid-lightness colours, so the first ~20 are clearly different and visible over photos,
    and ``make_palette(n)`` is a prefix of ``make_palette(m)`` for n < m <= ~3800 (a 16-level RGB
    grid); larger palettes are completed with random distinct colours. Black is never used: it marks
    ignored pixels. Any ``n`` up to 16,777,215 works; ``seed`` gives a different, equally spread palette.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if n > _MAX_COLOURS:
        raise ValueError(f"at most {_MAX_COLOURS} distinct colours exist besides black, got n={n}")
    if n == 0:
        return np.zeros((0, 3), dtype=np.uint8)
    base = _greedy_palette(int(seed), int(n))
    if n <= len(base):
        return base[:n].copy()
    # Beyond the grid: random distinct colours, never black and never one already in use.
    rng = np.random.default_rng([int(seed), int(n)])
    used = set((base[:, 0].astype(np.int64) << 16 | base[:, 1].astype(np.int64) << 8 | base[:, 2]).tolist())
    used.add(0)
    extra: list[int] = []
    need = n - len(base)
    while len(extra) < need:
        for code in rng.integers(1, 256**3, size=2 * (need - len(extra)) + 16).tolist():
            if code not in used:
                used.add(code)
                extra.append(code)
                if len(extra) == need:
                    break
    codes = np.array(extra, dtype=np.int64)
    rest = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8)
    return np.concatenate([base, rest])
