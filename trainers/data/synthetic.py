"""Built-in procedural image domains: a varied source domain and five related target domains.

Every image is a *scene*: a background and one to three shapes (circle, rounded square,
triangle, ring, ellipse) with a position, size, rotation and colour. The scene of image ``i`` is a
pure function of ``(domain, seed, i)``: its random numbers come from a counter-based hash
(SplitMix64) of those three values, so any slice of a domain can be rendered on its own, in any
order, and on any machine with the same result.

The *rendering style* and the *layout distribution* depend on the domain, so the target domains
are related to the source the way sketches are related to photographs:

========  =========================================================================================
source    rich colours, two-colour gradient backgrounds, 1-3 filled shapes of every kind with soft
          shading (darker rim, specular highlight from the top left)
sketch    grayscale pencil outlines (a slightly doubled stroke, sometimes hatching) on white paper
          with a faint grain; 1-2 large shapes, no rings
night     near-black blue sky, saturated glowing shapes with a halo and a whitish core; mostly
          small circles and rings
stripes   flat pale background, 1-2 shapes filled with diagonal two-colour stripes; circles,
          squares and triangles
mosaic    blocky, pixelated tiles (7-11 blocks a side) quantised to a fixed ten-colour tile palette;
          2-3 large shapes
pastel    pale, low-contrast colours, a soft pale gradient and blurred shape edges; mostly
          ellipses, rounded squares and circles
========  =========================================================================================

Rendering is vectorised with numpy over whole batches: signed distance functions evaluated on the
pixel-centre grid give anti-aliased coverage masks. Scene geometry lives in normalised ``[0, 1]``
coordinates, so 16², 32², 64² and 256² renders of the same index show the same scene.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["DOMAINS", "RENDER_VERSION", "TARGET_DOMAINS", "render"]

#: Bump whenever a change makes existing indices render differently: caches of decoded images
#: (:func:`trainers.data.sources.load_images`) include it in their key.
RENDER_VERSION = 1

DOMAINS: tuple[str, ...] = ("source", "sketch", "night", "stripes", "mosaic", "pastel")
TARGET_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d != "source")

CIRCLE, SQUARE, TRIANGLE, RING, ELLIPSE = range(5)
_MAX_SHAPES = 3
_SHAPE_U = 10  # random numbers per shape slot
_BG_U = 8  # random numbers for the background
_STYLE_U = 8  # random numbers for per-image style choices
_NU = _BG_U + _MAX_SHAPES * _SHAPE_U + _STYLE_U

# Layout distribution of each domain: how many shapes, which kinds (relative weights in the order
# circle, square, triangle, ring, ellipse), size range (circumradius-like, normalised units) and
# how far from the border the centres stay.
_LAYOUT: dict[str, dict] = {
    "source": dict(n=(1, 3), kinds=(1, 1, 1, 1, 1), size=(0.09, 0.28), margin=0.18),
    "sketch": dict(n=(1, 2), kinds=(1, 1, 1, 0, 1), size=(0.16, 0.32), margin=0.25),
    "night": dict(n=(1, 3), kinds=(7, 0.5, 0.5, 2, 0), size=(0.06, 0.18), margin=0.15),
    "stripes": dict(n=(1, 2), kinds=(1, 1.2, 1.2, 0, 0), size=(0.15, 0.30), margin=0.22),
    "mosaic": dict(n=(2, 3), kinds=(1, 1, 1, 0.5, 1), size=(0.16, 0.32), margin=0.2),
    "pastel": dict(n=(1, 3), kinds=(1, 1.3, 0.2, 0, 1.5), size=(0.12, 0.28), margin=0.2),
}

# A fixed, limited tile palette for the mosaic domain (terracotta, ochre, cream, teal, navy,
# dark red, olive, near-black, white, sky blue).
_MOSAIC_PALETTE = np.array(
    [[196, 98, 62], [214, 160, 52], [240, 226, 190], [38, 128, 124], [30, 46, 96],
     [128, 30, 36], [110, 120, 48], [28, 26, 30], [250, 250, 246], [110, 170, 214]],
    dtype=np.float32) / 255.0

_PIXEL_BUDGET = 1 << 18  # pixels per chunk: keeps the float32 temporaries in cache


# ---------------------------------------------------------------------------------------------
# random numbers: counter-based, so image i depends only on (domain, seed, i)

_M64 = (1 << 64) - 1


def _key(domain: str, seed: int) -> int:
    digest = hashlib.blake2b(f"fewshot-synthetic/{domain}/{int(seed)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniforms(domain: str, seed: int, indices: np.ndarray, n: int) -> np.ndarray:
    """float64 [len(indices), n] uniforms in [0, 1), a pure function of (domain, seed, index, j)."""
    key = np.uint64(_key(domain, seed))
    idx = indices.astype(np.uint64)[:, None]
    j = np.arange(n, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = _mix64(key ^ (idx * np.uint64(0x9E3779B97F4A7C15)))
        z = _mix64(z + (j + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------
# scenes


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs of one shape, output [..., 3] float32."""
    h = np.asarray(h, np.float64) % 1.0
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _lerp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def _layout(domain: str, u: np.ndarray) -> dict[str, np.ndarray]:
    """Turn the per-image uniforms [N, _NU] into the scene parameters of ``domain``."""
    spec = _LAYOUT[domain]
    n = len(u)
    bg = u[:, :_BG_U]
    sh = u[:, _BG_U:_BG_U + _MAX_SHAPES * _SHAPE_U].reshape(n, _MAX_SHAPES, _SHAPE_U)
    st = u[:, _BG_U + _MAX_SHAPES * _SHAPE_U:]
    lo, hi = spec["n"]
    count = lo + np.minimum((st[:, 0] * (hi - lo + 1)).astype(np.int64), hi - lo)
    weights = np.asarray(spec["kinds"], np.float64)
    cum = np.cumsum(weights / weights.sum())
    kind = np.minimum(np.searchsorted(cum, sh[..., 0], side="right"), len(cum) - 1)
    m = spec["margin"]
    return {
        "count": count,
        "active": np.arange(_MAX_SHAPES)[None, :] < count[:, None],
        "kind": kind,
        "cx": _lerp(sh[..., 1], m, 1 - m),
        "cy": _lerp(sh[..., 2], m, 1 - m),
        "size": _lerp(sh[..., 3], *spec["size"]),
        "rot": sh[..., 4] * 2 * np.pi,
        "aspect": _lerp(sh[..., 5], 0.4, 0.8),
        "hue": sh[..., 6], "sat": sh[..., 7], "val": sh[..., 8], "extra": sh[..., 9],
        "bg": bg, "style": st,
    }


# ---------------------------------------------------------------------------------------------
# signed distances (negative inside), in normalised units, on local (rotated) coordinates


def _sd_circle(px, py, r, aspect, extra):
    return np.sqrt(px * px + py * py) - r


def _sd_square(px, py, r, aspect, extra):
    b = 0.82 * r
    rr = b * (0.05 + 0.45 * extra)  # corner radius: from nearly sharp to very round
    qx = np.abs(px) - b + rr
    qy = np.abs(py) - b + rr
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0) - rr


def _sd_triangle(px, py, r, aspect, extra):
    # equilateral triangle of circumradius ~1.15 r (Inigo Quilez's exact SDF)
    k = np.float32(np.sqrt(3.0))
    a = np.float32(1.0) * r
    x = np.abs(px) - a
    y = -py + a / k
    flip = x + k * y > 0
    x2 = np.where(flip, (x - k * y) * 0.5, x)
    y2 = np.where(flip, (-k * x - y) * 0.5, y)
    x2 = x2 - np.clip(x2, -2 * a, 0)
    return -np.sqrt(x2 * x2 + y2 * y2) * np.sign(y2)


def _sd_ring(px, py, r, aspect, extra):
    return np.abs(np.sqrt(px * px + py * py) - 0.85 * r) - r * (0.12 + 0.18 * extra)


def _sd_ellipse(px, py, r, aspect, extra):
    a, b = r * 1.1, r * 1.1 * aspect
    return (np.sqrt((px / a) ** 2 + (py / b) ** 2) - 1.0) * b


_SDF = (_sd_circle, _sd_square, _sd_triangle, _sd_ring, _sd_ellipse)


def _shape_sdf(scene: dict, k: int, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Signed distance [N, H, W] of shape slot ``k`` of every image (large where inactive)."""
    n = len(scene["count"])
    d = np.full((n, Y.shape[0], X.shape[1]), 10.0, np.float32)

    def col(name, sel):
        return scene[name][sel, k].astype(np.float32)[:, None, None]

    for kind, fn in enumerate(_SDF):
        sel = np.nonzero(scene["active"][:, k] & (scene["kind"][:, k] == kind))[0]
        if sel.size == 0:
            continue
        rot = scene["rot"][sel, k]
        c = np.cos(rot).astype(np.float32)[:, None, None]
        s = np.sin(rot).astype(np.float32)[:, None, None]
        dx = X[None] - col("cx", sel)
        dy = Y[None] - col("cy", sel)
        px, py = dx * c + dy * s, dy * c - dx * s
        d[sel] = fn(px, py, col("size", sel), col("aspect", sel), col("extra", sel))
    return d


def _coverage(d: np.ndarray, width) -> np.ndarray:
    """Anti-aliased inside-coverage from a signed distance: a linear ramp ``width`` wide."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _gradient(scene: dict, X: np.ndarray, Y: np.ndarray, c0: np.ndarray, c1: np.ndarray,
              angle: np.ndarray) -> np.ndarray:
    """Linear two-colour gradient [N, H, W, 3] across the image at ``angle`` (radians)."""
    ca = np.cos(angle).astype(np.float32)[:, None, None]
    sa = np.sin(angle).astype(np.float32)[:, None, None]
    t = np.clip(0.5 + ((X[None] - 0.5) * ca + (Y[None] - 0.5) * sa) * 0.9, 0.0, 1.0)[..., None]
    return c0[:, None, None, :] * (1 - t) + c1[:, None, None, :] * t


def _stripes(X, Y, angle, freq, phase, aa) -> np.ndarray:
    """Anti-aliased 0/1 stripe pattern [N, H, W]; fades to 0.5 when the period nears 2 pixels."""
    ca = np.cos(angle).astype(np.float32)[:, None, None]
    sa = np.sin(angle).astype(np.float32)[:, None, None]
    f = freq.astype(np.float32)[:, None, None]
    t = (X[None] * ca + Y[None] * sa) * f + phase.astype(np.float32)[:, None, None]
    e = (np.abs(t - np.floor(t) - 0.5) - 0.25) / f  # distance to the nearest stripe edge
    on = np.clip(0.5 + e / aa, 0.0, 1.0)
    period_px = 1.0 / (f * aa)
    contrast = np.clip((period_px - 2.0) / 2.0, 0.0, 1.0)
    return 0.5 + (on - 0.5) * contrast


def _shape_colours(scene, k, sat, val) -> np.ndarray:
    return _hsv(scene["hue"][:, k], _lerp(scene["sat"][:, k], *sat), _lerp(scene["val"][:, k], *val))


# ---------------------------------------------------------------------------------------------
# styles: each returns float32 [N, H, W, 3] in [0, 1]


def _style_source(scene, X, Y, aa):
    bg = scene["bg"]
    c0 = _hsv(bg[:, 0], _lerp(bg[:, 1], 0.3, 0.8), _lerp(bg[:, 2], 0.35, 0.95))
    c1 = _hsv(bg[:, 0] + _lerp(bg[:, 3], -0.25, 0.25), _lerp(bg[:, 4], 0.3, 0.8),
              _lerp(bg[:, 5], 0.35, 0.95))
    img = _gradient(scene, X, Y, c0, c1, bg[:, 6] * 2 * np.pi)
    for k in range(_MAX_SHAPES):
        if not scene["active"][:, k].any():
            continue
        d = _shape_sdf(scene, k, X, Y)
        cov = _coverage(d, aa)[..., None]
        base = _shape_colours(scene, k, (0.55, 1.0), (0.55, 1.0))[:, None, None, :]
        r = scene["size"][:, k].astype(np.float32)[:, None, None]
        hx = scene["cx"][:, k].astype(np.float32)[:, None, None] - 0.35 * r
        hy = scene["cy"][:, k].astype(np.float32)[:, None, None] - 0.35 * r
        hl = np.exp(-((X[None] - hx) ** 2 + (Y[None] - hy) ** 2) / (0.5 * r) ** 2)[..., None]
        inner = np.clip(-d / (0.6 * r), 0.0, 1.0)[..., None]
        col = base * (0.6 + 0.4 * inner)  # darker rim
        col = col + (1.0 - col) * (0.55 * hl)  # highlight
        img = img + (col - img) * cov
    return img


def _style_sketch(scene, X, Y, aa):
    st = scene["style"]
    grain = (np.sin((X[None] * 37.0 + Y[None] * 11.0) + st[:, 1, None, None] * 6.283)
             + np.sin((X[None] * -13.0 + Y[None] * 41.0) + st[:, 2, None, None] * 6.283)) * 0.5
    paper = (0.955 + 0.025 * grain).astype(np.float32)
    keep = np.ones_like(paper)  # product of (1 - ink) over strokes
    for k in range(_MAX_SHAPES):
        if not scene["active"][:, k].any():
            continue
        d = _shape_sdf(scene, k, X, Y)
        dark = _lerp(scene["val"][:, k], 0.55, 0.9).astype(np.float32)[:, None, None]
        lw = max(0.014, aa) * 0.5
        line = _coverage(np.abs(d) - lw, aa)
        off = 0.006 + 0.01 * scene["sat"][:, k].astype(np.float32)[:, None, None]
        line2 = _coverage(np.abs(d - off) - 0.5 * lw, aa) * 0.5  # the second, lighter pass
        keep *= 1.0 - dark * line
        keep *= 1.0 - dark * line2
        hatched = (scene["extra"][:, k] > 0.4).astype(np.float32)[:, None, None]
        if hatched.any():
            angle = np.where(st[:, 3] > 0.5, np.pi / 4, -np.pi / 4)
            h = _stripes(X, Y, angle, _lerp(st[:, 4], 14.0, 20.0), st[:, 5], aa)
            keep *= 1.0 - 0.3 * dark * hatched * h * _coverage(d, aa)
    return np.repeat((paper * keep)[..., None], 3, axis=-1)


def _style_night(scene, X, Y, aa):
    bg = scene["bg"]
    top = _hsv(_lerp(bg[:, 0], 0.58, 0.72), _lerp(bg[:, 1], 0.5, 0.9), _lerp(bg[:, 2], 0.08, 0.18))
    bottom = _hsv(_lerp(bg[:, 3], 0.6, 0.75), _lerp(bg[:, 4], 0.4, 0.9), _lerp(bg[:, 5], 0.0, 0.05))
    img = _gradient(scene, X, Y, top, bottom, np.full(len(bg), np.pi / 2) + _lerp(bg[:, 6], -0.4, 0.4))
    for k in range(_MAX_SHAPES):
        if not scene["active"][:, k].any():
            continue
        d = _shape_sdf(scene, k, X, Y)
        cov = _coverage(d, aa)[..., None]
        col = _shape_colours(scene, k, (0.75, 1.0), (0.95, 1.0))[:, None, None, :]
        g = _lerp(scene["extra"][:, k], 0.025, 0.06).astype(np.float32)[:, None, None]
        halo = (np.exp(-np.maximum(d, 0.0) / g) * 0.75)[..., None]
        img = img + col * halo * (1.0 - cov)
        r = scene["size"][:, k].astype(np.float32)[:, None, None]
        inner = np.clip(-d / (0.7 * r), 0.0, 1.0)[..., None]
        core = col + (1.0 - col) * (0.6 * inner)
        img = img + (core - img) * cov
    return np.clip(img, 0.0, 1.0)


def _style_stripes(scene, X, Y, aa):
    bg = scene["bg"]
    st = scene["style"]
    flat = _hsv(bg[:, 0], _lerp(bg[:, 1], 0.25, 0.55), _lerp(bg[:, 2], 0.65, 0.9))
    n = len(bg)
    img = np.broadcast_to(flat[:, None, None, :], (n, Y.shape[0], X.shape[1], 3)).copy()
    angle = np.where(st[:, 1] > 0.5, np.pi / 4, -np.pi / 4) + _lerp(st[:, 2], -0.15, 0.15)
    stripe = _stripes(X, Y, angle, _lerp(st[:, 3], 4.0, 7.0), st[:, 4], aa)[..., None]
    for k in range(_MAX_SHAPES):
        if not scene["active"][:, k].any():
            continue
        d = _shape_sdf(scene, k, X, Y)
        cov = _coverage(d, aa)[..., None]
        a = _shape_colours(scene, k, (0.65, 0.95), (0.55, 0.9))
        dark = (scene["extra"][:, k] > 0.5)[:, None]
        b = np.where(dark, a * 0.35, np.float32(0.97))
        fill = a[:, None, None, :] * stripe + b[:, None, None, :] * (1.0 - stripe)
        img = img + (fill - img) * cov
    return img


def _style_mosaic(scene, X, Y, aa):
    bg, st = scene["bg"], scene["style"]
    n_pal = len(_MOSAIC_PALETTE)
    blocks = 7 + np.minimum((st[:, 1] * 5).astype(np.int64), 4)  # 7..11 tiles a side
    n, h, w = len(blocks), Y.shape[0], X.shape[1]
    # background and shapes take palette colours; a shape never takes the background's colour
    bg_idx = np.minimum((bg[:, 0] * n_pal).astype(np.int64), n_pal - 1)
    shape_idx = (bg_idx[:, None] + 1 + np.minimum((scene["hue"] * (n_pal - 1)).astype(np.int64),
                                                  n_pal - 2)) % n_pal
    out = np.empty((n, h, w, 3), np.float32)
    for b in np.unique(blocks):
        sel = np.nonzero(blocks == b)[0]
        sub = {key: val[sel] for key, val in scene.items()}
        centres = ((np.arange(b) + 0.5) / b).astype(np.float32)
        sx, sy = centres[None, :], centres[:, None]
        small = np.broadcast_to(_MOSAIC_PALETTE[bg_idx[sel]][:, None, None, :],
                                (len(sel), b, b, 3)).copy()
        for k in range(_MAX_SHAPES):
            if not sub["active"][:, k].any():
                continue
            cov = _coverage(_shape_sdf(sub, k, sx, sy), 1.0 / b)[..., None]
            small += (_MOSAIC_PALETTE[shape_idx[sel, k]][:, None, None, :] - small) * cov
        dist = ((small[..., None, :] - _MOSAIC_PALETTE) ** 2).sum(-1)
        small = _MOSAIC_PALETTE[np.argmin(dist, axis=-1)]
        iy = np.minimum((Y[:, 0] * b).astype(np.int64), b - 1)
        ix = np.minimum((X[0, :] * b).astype(np.int64), b - 1)
        out[sel] = small[:, iy][:, :, ix]
    return out


def _style_pastel(scene, X, Y, aa):
    bg = scene["bg"]
    c0 = _hsv(bg[:, 0], _lerp(bg[:, 1], 0.05, 0.18), _lerp(bg[:, 2], 0.9, 1.0))
    c1 = _hsv(bg[:, 0] + _lerp(bg[:, 3], -0.15, 0.15), _lerp(bg[:, 4], 0.05, 0.18),
              _lerp(bg[:, 5], 0.9, 1.0))
    img = _gradient(scene, X, Y, c0, c1, bg[:, 6] * 2 * np.pi)
    blur = _lerp(scene["style"][:, 1], 0.025, 0.055).astype(np.float32)[:, None, None]
    for k in range(_MAX_SHAPES):
        if not scene["active"][:, k].any():
            continue
        d = _shape_sdf(scene, k, X, Y)
        cov = _coverage(d, aa + blur)[..., None] * 0.85
        col = _shape_colours(scene, k, (0.18, 0.38), (0.88, 1.0))[:, None, None, :]
        img = img + (col - img) * cov
    return img


_STYLES = {"source": _style_source, "sketch": _style_sketch, "night": _style_night,
           "stripes": _style_stripes, "mosaic": _style_mosaic, "pastel": _style_pastel}


# ---------------------------------------------------------------------------------------------
# public API


def _check_domain(domain: str) -> None:
    if domain not in _STYLES:
        raise ValueError(f"unknown synthetic domain {domain!r}; known domains: {', '.join(DOMAINS)}")


def render(domain: str, count: int, resolution: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Render images ``start .. start + count - 1`` of a built-in synthetic domain.

    Args:
        domain: one of :data:`DOMAINS` (``"source"`` or a target domain in :data:`TARGET_DOMAINS`).
        count: how many images (``>= 0``).
        resolution: side length in pixels (``>= 1``); the scenes are resolution independent.
        seed: selects an independent draw of the domain.
        start: index of the first image, so that ``render(d, 5, r, s, start=3)`` equals
            ``render(d, 8, r, s)[3:]``.

    Returns:
        uint8 array ``[count, resolution, resolution, 3]``; image ``i`` depends only on
        ``(domain, seed, start + i, resolution)``.

    Raises:
        ValueError: an unknown domain (the message lists the known ones) or a bad count,
            resolution or start.
    """
    _check_domain(domain)
    count, resolution, start = int(count), int(resolution), int(start)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    out = np.empty((count, resolution, resolution, 3), np.uint8)
    if count == 0:
        return out
    coords = ((np.arange(resolution) + 0.5) / resolution).astype(np.float32)
    X, Y = coords[None, :], coords[:, None]
    aa = 1.0 / resolution
    style = _STYLES[domain]
    chunk = max(1, _PIXEL_BUDGET // (resolution * resolution))
    for lo in range(0, count, chunk):
        hi = min(count, lo + chunk)
        u = _uniforms(domain, seed, np.arange(start + lo, start + hi), _NU)
        img = style(_layout(domain, u), X, Y, aa)
        out[lo:hi] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out
