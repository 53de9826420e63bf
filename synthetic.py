"""Procedural street scenes, a pure function of (seed, index): the ``synthetic`` preset, no files, no network.

``make_synthetic_splits`` wraps the renderer into lazily rendered ``datasets.Dataset`` splits; the usual way in is
``data.load_splits(DataOptions(dataset="synthetic"))``. The class names are ``data.SYNTHETIC_CLASSES``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import datasets
import numpy as np

# Label values the renderer paints, in the order of data.SYNTHETIC_CLASSES (tests/test_synthetic.py checks that the
# two agree). 255 marks ignored outlines.
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PERSON, POLE, SIGN = range(9)
IGNORE = 255


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) float32 noise, bilinearly interpolated from a (cells+1)^2 random grid."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    ys, xs = np.linspace(0, cells, height, dtype=np.float32), np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(np.int64), cells - 1), np.minimum(xs.astype(np.int64), cells - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    columns = grid[:, x0] * (1 - wx) + grid[:, x0 + 1] * wx  # along x for every grid row, then along y
    return columns[y0] * (1 - wy) + columns[y0 + 1] * wy


class _Canvas:
    """Image/label buffers plus pixel coordinates; drawing is confined to windows for speed."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng, self.h, self.w = rng, height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.zeros((height, width), dtype=np.uint8)

    def window(self, top: float, bottom: float, left: float, right: float
               ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Slices and coordinates of a box clipped to the image; None if it is off-image."""
        y0, y1 = max(int(math.floor(top)), 0), min(int(math.ceil(bottom)) + 1, self.h)
        x0, x1 = max(int(math.floor(left)), 0), min(int(math.ceil(right)) + 1, self.w)
        if y0 >= y1 or x0 >= x1:
            return None
        box = (slice(y0, y1), slice(x0, x1))
        return box, self.yy[box], self.xx[box]

    def paint(self, box: tuple[slice, slice], mask: np.ndarray, colour: np.ndarray, cls: int, grain: float) -> None:
        """Fill ``mask`` (window-shaped) with a colour (3,) or a window-shaped colour field, plus ``grain`` noise."""
        if not mask.any():
            return
        colour = np.asarray(colour, dtype=np.float32)
        pixels = colour[mask] if colour.ndim == 3 else np.broadcast_to(colour, (int(mask.sum()), 3))
        noise = self.rng.normal(0.0, grain, size=pixels.shape).astype(np.float32)
        self.image[box][mask], self.label[box][mask] = pixels + noise, cls

    def bar(self, x0: float, half_width: float, base_y: float, height: float, colour: Sequence[float], cls: int,
            jitter: float) -> None:
        """A vertical bar (a trunk, a pole) standing on row ``base_y``; its colour is drawn only if it is seen."""
        if (win := self.window(base_y - height, base_y, x0 - half_width, x0 + half_width)) is not None:
            box, wy, wx = win
            bar = (np.abs(wx - x0) < half_width) & (wy <= base_y) & (wy > base_y - height)
            self.paint(box, bar, _jitter(self.rng, colour, jitter), cls, grain=0.03 if cls == VEGETATION else 0.02)


class _Street(NamedTuple):
    """The road per image row, (H,) arrays: ``depth`` 0 at the horizon and 1 at the bottom, ``centre`` the road's
    centre x, ``half`` its half width, ``walk`` the sidewalk width."""

    horizon: float
    depth: np.ndarray
    centre: np.ndarray
    half: np.ndarray
    walk: np.ndarray

    def at_row(self, base_y: float) -> tuple[float, float, float, float]:
        """(depth, centre, half width, sidewalk width) at the row ``base_y`` (clipped to the image)."""
        r = min(max(int(base_y), 0), len(self.depth) - 1)
        return float(self.depth[r]), float(self.centre[r]), float(self.half[r]), float(self.walk[r])

    def beside_road(self, rng: np.random.Generator, base_y: float, lo: float, hi: float) -> float:
        """An x on a random side of the road, ``lo``..``hi`` sidewalk widths beyond the kerb."""
        _, cx, hw, wk = self.at_row(base_y)
        return cx + (1 if rng.uniform() < 0.5 else -1) * (hw + rng.uniform(lo, hi) * wk)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def _random_hue(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    hue = rng.uniform(0, 1)
    s, v = rng.uniform(*saturation), rng.uniform(*value)
    rgb = np.clip(np.abs(np.mod(hue * 6 + np.array([0.0, 4.0, 2.0]), 6) - 3) - 1, 0, 1)
    return (((1 - s) + s * rgb) * v).astype(np.float32)


def render_synthetic_scene(seed: int, index: int, height: int = 128, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One road scene: image (H, W, 3) uint8 RGB, label (H, W) uint8 in ``SKY``..``SIGN`` (0..8) or 255.

    Colours are drawn per scene and object (grey cars on grey roads, skies as grey as concrete) with smooth and
    per-pixel noise, so that colour alone does not give the class away; nearer objects are larger and in front.
    Car and person outlines are 255 (ignored), like annotation edges in real data.
    """
    # The random draws happen in a fixed order (sky, buildings, road, objects, noise): reordering changes every scene.
    rng = np.random.default_rng([int(seed), int(index)])
    canvas = _Canvas(rng, height, width)
    coarse, fine = _smooth_noise(rng, height, width, 6), _smooth_noise(rng, height, width, max(8, width // 5))
    horizon = height * rng.uniform(0.36, 0.56)
    _draw_sky(canvas, horizon, coarse)
    _draw_buildings(canvas, horizon, coarse)
    street = _draw_ground(canvas, horizon, coarse, fine)
    return _finish(canvas, _draw_objects(canvas, street, fine))


def _draw_sky(c: _Canvas, horizon: float, coarse: np.ndarray) -> None:
    """Clear, overcast or dusk gradient with cloud-like noise, over the whole image."""
    top, bottom = (((0.25, 0.45, 0.85), (0.65, 0.78, 0.95)), ((0.55, 0.57, 0.6), (0.75, 0.76, 0.78)),
                   ((0.35, 0.3, 0.55), (0.95, 0.6, 0.4)))[int(c.rng.integers(3))]
    t = (c.yy / max(horizon, 1.0)).clip(0, 1)[..., None]
    sky = _jitter(c.rng, top, 0.08) * (1 - t) + _jitter(c.rng, bottom, 0.08) * t + 0.06 * coarse[..., None]
    c.paint((slice(0, c.h), slice(0, c.w)), np.ones((c.h, c.w), dtype=bool), sky, SKY, grain=0.01)


_FACADES = ((0.55, 0.3, 0.25), (0.78, 0.7, 0.55), (0.5, 0.5, 0.52), (0.68, 0.68, 0.66), (0.45, 0.55, 0.65),
            (0.35, 0.3, 0.28))


def _draw_buildings(c: _Canvas, horizon: float, coarse: np.ndarray) -> None:
    """Buildings along the horizon, with window grids or stripes, and gaps of sky between some of them."""
    rng, w, h = c.rng, c.w, c.h
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        if rng.uniform() < 0.15:
            x += rng.uniform(0.03, 0.1) * w
            continue
        bw, roof = rng.uniform(0.12, 0.35) * w, horizon * (1 - rng.uniform(0.3, 1.0))
        if (win := c.window(roof, horizon + 1, x, x + bw)) is not None:
            box, by, bx = win
            mask = (bx >= x) & (bx < x + bw) & (by >= roof) & (by < horizon + 1)
            base = _jitter(rng, _FACADES[int(rng.integers(len(_FACADES)))], 0.08)
            facade = base + 0.05 * coarse[box][..., None] * rng.choice((-1.0, 1.0))
            if rng.uniform() < 0.8:
                px, py = rng.uniform(0.04, 0.08) * w, rng.uniform(0.05, 0.09) * h
                windows = (np.mod(bx - x, px) > px * 0.35) & (np.mod(by - roof, py) > py * 0.4)
                windows &= (bx > x + 0.3 * px) & (bx < x + bw - 0.3 * px) & (by > roof + 0.3 * py)
                glass = _jitter(rng, (0.15, 0.18, 0.25) if rng.uniform() < 0.6 else (0.6, 0.75, 0.85), 0.07)
                facade = np.where(windows[..., None], glass, facade)
            else:
                facade = facade - 0.06 * (np.mod(bx - x, rng.uniform(2.0, 5.0)) < 1.0)[..., None]
            c.paint(box, mask, facade, BUILDING, grain=0.02)
        x += bw


def _draw_ground(c: _Canvas, horizon: float, coarse: np.ndarray, fine: np.ndarray) -> _Street:
    """Perspective road with lane markings, kerbs, sidewalks and an optional grass verge."""
    rng, h, w = c.rng, c.h, c.w
    depth_row = ((np.arange(h, dtype=np.float32) - horizon) / max(h - horizon, 1.0)).clip(0, 1)
    vanish_x = rng.uniform(0.35, 0.65) * w
    bottom_x = vanish_x + rng.uniform(-0.15, 0.15) * w
    half_row = rng.uniform(0.01, 0.04) * w + rng.uniform(0.3, 0.55) * w * depth_row
    street = _Street(horizon, depth_row, vanish_x + (bottom_x - vanish_x) * depth_row, half_row,
                     half_row * rng.uniform(0.35, 0.9) + 2.0)
    if (g0 := int(math.ceil(horizon))) >= h:
        return street
    box = (slice(g0, h), slice(0, w))
    gy, gx = c.yy[box], c.xx[box]
    depth, half, walk = depth_row[g0:, None], half_row[g0:, None], street.walk[g0:, None]
    dist = np.abs(gx - street.centre[g0:, None])
    road = dist < half
    pavement = _jitter(rng, ((0.62, 0.62, 0.6), (0.72, 0.66, 0.55), (0.6, 0.45, 0.4))[int(rng.integers(3))], 0.06)
    tile = rng.uniform(3.0, 7.0)
    tiles = (np.mod(gx, tile) < 0.8) | (np.mod(gy, tile * 0.6) < 0.8)
    kerb = (dist >= half) & (dist < half + 1.0 + depth * 0.02 * w)
    paving = np.where(kerb[..., None], np.clip(pavement + 0.12, 0, 1), pavement - 0.07 * tiles[..., None])
    side = ~road & (dist < half + walk) if (verge := bool(rng.uniform() < 0.45)) else ~road
    c.paint(box, side, paving, SIDEWALK, grain=0.025)
    if verge:
        c.paint(box, ~road & ~side, _jitter(rng, (0.3, 0.5, 0.2), 0.08) + 0.08 * fine[box][..., None], VEGETATION,
                grain=0.06)
    asphalt = (np.float32(rng.uniform(0.18, 0.45)) + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
               + 0.04 * coarse[box][..., None])
    dashes = (np.sin(rng.uniform(2.0, 4.0) / (depth + 0.04)) > 0.1) & (dist < 0.4 + 0.012 * w * depth)
    marking = np.asarray((0.9, 0.9, 0.88) if rng.uniform() < 0.7 else (0.9, 0.8, 0.3), dtype=np.float32)
    c.paint(box, road, np.where(dashes[..., None], marking, asphalt), ROAD, grain=0.03)
    return street


def _draw_objects(c: _Canvas, street: _Street, fine: np.ndarray) -> np.ndarray:
    """Trees, poles, cars and people, far first so nearer ones occlude; returns the (H, W) outlined mask."""
    rng, horizon = c.rng, street.horizon
    span = max(c.h - horizon, 1.0)
    # Per kind: where its base row lies (as a share of the rows below the horizon), fewest and most + 1 of them.
    kinds = ((_draw_tree, 0.05, 0.7, 0, 4), (_draw_pole, 0.1, 0.95, 1, 4), (_draw_car, 0.08, 1.1, 0, 5),
             (_draw_person, 0.05, 1.0, 0, 6))
    objects = [(horizon + rng.uniform(lo, hi) * span, draw) for draw, lo, hi, fewest, most in kinds
               for _ in range(rng.integers(fewest, most))]
    outlined = np.zeros((c.h, c.w), dtype=bool)  # cars and people: their edges become ignore
    for base_y, draw in sorted(objects, key=lambda item: item[0]):
        draw(c, street, base_y, fine if draw is _draw_tree else outlined)
    return outlined


def _draw_tree(c: _Canvas, street: _Street, base_y: float, fine: np.ndarray) -> None:
    """A trunk and a crown of overlapping discs on the verge, standing at row ``base_y``."""
    rng, scale = c.rng, 0.15 + 0.85 * street.at_row(base_y)[0]
    x0 = street.beside_road(rng, base_y, 0.5, 1.6)
    trunk_h, radius = 0.35 * c.h * scale, 0.12 * c.h * scale
    c.bar(x0, max(1.0, 0.02 * c.w * scale), base_y, trunk_h, (0.35, 0.25, 0.15), VEGETATION, 0.05)
    crown_y = base_y - trunk_h
    if (win := c.window(crown_y - 1.8 * radius, crown_y + 1.4 * radius, x0 - 2 * radius, x0 + 2 * radius)) is None:
        return
    box, wy, wx = win
    canopy = np.zeros(wy.shape, dtype=bool)
    for _ in range(rng.integers(2, 5)):
        oy, ox = crown_y - rng.uniform(-0.3, 0.6) * radius, x0 + rng.uniform(-0.8, 0.8) * radius
        r = radius * rng.uniform(0.6, 1.1)
        canopy |= (wy - oy) ** 2 + (wx - ox) ** 2 < r * r
    c.paint(box, canopy, _jitter(rng, (0.2, 0.45, 0.15), 0.1) + 0.12 * fine[box][..., None], VEGETATION, grain=0.08)


_SIGN_FACES = ((0.85, 0.1, 0.1), (0.1, 0.3, 0.8), (0.95, 0.8, 0.1), (0.92, 0.92, 0.92))


def _draw_pole(c: _Canvas, street: _Street, base_y: float, _unused: np.ndarray) -> None:
    """A pole at the kerb, often topped by a round, square or triangular sign."""
    rng, d = c.rng, street.at_row(base_y)[0]
    scale = 0.15 + 0.85 * d
    x0, pole_h = street.beside_road(rng, base_y, 0.05, 0.3), (0.3 + 0.4 * d) * c.h
    c.bar(x0, max(0.6, 0.008 * c.w * scale), base_y, pole_h, (0.3, 0.3, 0.32), POLE, 0.12)
    if rng.uniform() >= 0.65:
        return
    size = max(1.5, 0.05 * c.h * scale)
    sy, sx, shape = base_y - pole_h + size, x0, int(rng.integers(3))
    colour = _jitter(rng, _SIGN_FACES[int(rng.integers(len(_SIGN_FACES)))], 0.06)
    if (win := c.window(sy - size, sy + size, sx - size, sx + size)) is None:
        return
    box, wy, wx = win
    sign = ((wy - sy) ** 2 + (wx - sx) ** 2 < size * size, (np.abs(wy - sy) < size) & (np.abs(wx - sx) < size),
            (wy > sy - size) & (wy < sy + size) & (np.abs(wx - sx) < (wy - sy + size) * 0.6))[shape]
    inner = (np.abs(wy - sy) < size * 0.3) & (np.abs(wx - sx) < size * 0.5)
    c.paint(box, sign, np.where(inner[..., None], 1.0 - colour, colour), SIGN, grain=0.02)


def _draw_car(c: _Canvas, street: _Street, base_y: float, outlined: np.ndarray) -> None:
    """A car on the road (body, cabin, windows, wheels); marks its pixels in ``outlined``."""
    rng, (d, cx, hw, _) = c.rng, street.at_row(base_y)
    x0 = cx + rng.uniform(-0.75, 0.75) * hw
    car_w = (0.08 + 0.42 * d) * c.w
    car_h, wheel_r = car_w * rng.uniform(0.45, 0.65), car_w * 0.11
    paint = _random_hue(rng, (0.0, 0.9), (0.15, 0.95))
    if (win := c.window(base_y - car_h, base_y + wheel_r, x0 - car_w / 2, x0 + car_w / 2)) is None:
        return
    box, wy, wx = win
    body = (np.abs(wx - x0) < car_w / 2) & (wy <= base_y) & (wy > base_y - car_h * 0.6)
    cabin = (np.abs(wx - x0) < car_w * 0.33) & (wy <= base_y - car_h * 0.55) & (wy > base_y - car_h)
    glass = (np.abs(wx - x0) < car_w * 0.28) & (wy <= base_y - car_h * 0.6) & (wy > base_y - car_h * 0.92)
    wheels = (((wx - (x0 - car_w * 0.3)) ** 2 + (wy - base_y) ** 2 < wheel_r ** 2) |
              ((wx - (x0 + car_w * 0.3)) ** 2 + (wy - base_y) ** 2 < wheel_r ** 2)) & (wy <= base_y + car_w * 0.05)
    colours = np.where(glass[..., None], np.float32((0.2, 0.25, 0.3)), paint)
    c.paint(box, car := body | cabin | wheels, np.where(wheels[..., None], np.float32((0.05, 0.05, 0.05)), colours),
            CAR, grain=0.02)
    outlined[box] |= car


def _draw_person(c: _Canvas, street: _Street, base_y: float, outlined: np.ndarray) -> None:
    """A person on the sidewalk (legs, torso, head); marks its pixels in ``outlined``."""
    rng, d = c.rng, street.at_row(base_y)[0]
    x0, ph = street.beside_road(rng, base_y, 0.1, 0.95), (0.1 + 0.3 * d) * c.h
    pw, head_r = ph * rng.uniform(0.22, 0.32), ph * 0.1
    skin = _jitter(rng, ((0.9, 0.75, 0.6), (0.6, 0.42, 0.3), (0.35, 0.25, 0.18))[int(rng.integers(3))], 0.05)
    shirt, trousers = _random_hue(rng, (0.2, 1.0), (0.2, 0.95)), _random_hue(rng, (0.0, 0.6), (0.1, 0.5))
    if (win := c.window(base_y - ph, base_y, x0 - pw / 2, x0 + pw / 2)) is None:
        return
    box, wy, wx = win
    legs = (np.abs(wx - x0) < pw * 0.35) & (wy <= base_y) & (wy > base_y - ph * 0.45)
    torso = (np.abs(wx - x0) < pw / 2) & (wy <= base_y - ph * 0.45) & (wy > base_y - ph * 0.8)
    head = (wy - (base_y - ph * 0.88)) ** 2 + (wx - x0) ** 2 < head_r * head_r
    colours = np.where(torso[..., None], shirt, np.where(legs[..., None], trousers, skin))
    c.paint(box, person := legs | torso | head, colours, PERSON, grain=0.03)
    outlined[box] |= person


def _finish(c: _Canvas, outlined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ignore band on outlines, then global gain, offset and sensor noise; uint8 image and label."""
    # 1-px ignore band where a car or person meets anything else (annotation edges).
    label, edge = c.label, np.zeros((c.h, c.w), dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label = np.where(edge & outlined, np.uint8(IGNORE), label)
    gain, offset = c.rng.uniform(0.8, 1.2), c.rng.uniform(-0.06, 0.06)
    image = c.image * gain + offset + c.rng.normal(0.0, c.rng.uniform(0.01, 0.04), c.image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label.astype(np.uint8)


def _render_batch(seed: int, height: int, width: int, batch: dict[str, list]) -> dict[str, list]:
    """``with_transform``'s callable (bound by a picklable ``functools.partial``, which DataLoader workers need
    under any start method): ``{"index", "image" (H, W, 3) uint8, "label" (H, W) uint8}`` lists."""
    scenes = [render_synthetic_scene(seed, index, height, width) for index in batch["index"]]
    return {"index": list(batch["index"]), "image": [s[0] for s in scenes], "label": [s[1] for s in scenes]}


def make_synthetic_splits(num_train: int = 512, num_eval: int = 64, *, height: int = 128, width: int = 128,
                          seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train/eval ``datasets.Dataset`` of scenes rendered on access, rows ``{"index", "image" (H, W, 3) uint8,
    "label" (H, W) uint8}``: indices 0..num_train-1 and then num_eval more, so the splits share no scene.
    ValueError for an empty split or scenes smaller than 16x16."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"synthetic splits need at least one scene each, got {num_train} train / {num_eval} eval")
    if height < 16 or width < 16:
        raise ValueError(f"synthetic scenes must be at least 16x16, got {height}x{width}")
    renderer = functools.partial(_render_batch, int(seed), int(height), int(width))
    train = datasets.Dataset.from_dict({"index": list(range(num_train))}, split="train")
    evaluation = datasets.Dataset.from_dict({"index": list(range(num_train, num_train + num_eval))}, split="validation")
    return train.with_transform(renderer), evaluation.with_transform(renderer)
