"""The synthetic "shapes" dataset: deterministic street-scene-like images with full annotations.

Each image is a small street scene. Four *stuff* classes cover every pixel of the background (a sky
gradient with clouds, building blocks with window grids, grass and tree crowns, a road in
perspective with lane markings); five *thing* classes stand on the ground in front of it as
overlapping instances of varied scale (cars, people, traffic signs, balls, cones). Thing colours
are jittered and overlap between classes (a red ball, a red car, a red shirt), so a model has to
use shape as well as colour.

One scene is written in three formats at once:

* semantic segmentation in the ADE20K layout (``images/{training,validation}/*.png``,
  ``annotations/{training,validation}/*.png``),
* COCO instances (``annotations/instances_{training,validation}.json``, RLE masks),
* COCO panoptic (``annotations/panoptic_{training,validation}.json`` and PNGs in
  ``annotations/panoptic_{training,validation}/``),

plus ``meta.json`` (classes, palette, thing/stuff split, generator version, domain, arguments,
counts).

Two *domains* render the same scenes, for unsupervised domain adaptation (labelled source,
unlabelled target, like GTA and Cityscapes):

* ``'source'`` (the default): the look described above, flat saturated paints, crisp edges.
* ``'target'``: the same geometry, labels and label files byte for byte, photographed
  differently. Overcast skies (pale grey gradients under stratus bands instead of blue with
  white clouds), dry olive grass with blades and bare soil, worn darker asphalt with faded
  markings and repair patches, plain plaster/brick/concrete facades with weathering streaks and
  floor lines instead of window grids, darker clumpy foliage; things keep their shapes but get
  muted, slightly hue-shifted, grimy paints lit from one side and cast soft shadows; then a camera:
  lens blur, vignetting, a warm white-balance error, shot and read noise, and a flatter tone
  curve. Its randomness comes from a second generator seeded from a copy of the scene's, so the
  scene's own draws (and thus every label) are those of the source domain.

Conventions:

* Images are PNG, not JPEG: JPEG artefacts would blur the exact class boundaries.
* Semantic label maps are uint8 class ids ``0..len(CLASSES)-1`` used directly
  (``reduce_zero_label=False``); ``IGNORE_INDEX`` (255) is reserved for "ignore" but never written,
  because the stuff classes cover every pixel.
* COCO category ids are ``class id + 1`` in both JSON files (COCO ids start at 1, and the panoptic
  format reserves segment id 0 for VOID). The category lists put the things first, so mmdet's
  panoptic datasets (which number classes in that order) give things the labels below stuff.
  Image ids are ``index + 1``; file stems carry the 0-based index (``train_000000.png`` has image
  id 1).
* Panoptic segment ids: a stuff segment's id is its category id; a thing segment's id is
  ``category id * 1000 + n`` with ``n`` its 1-based position in the image's instance list.
  PNGs encode ``id = R + 256 * G + 256**2 * B``.
* Instance masks and boxes are *visible* (modal): later instances occlude earlier ones, and an
  instance with fewer than ``min_instance_area`` visible pixels is dropped before drawing, so no
  pixel shows an object without an annotation.
* Determinism: image ``index`` of a split depends only on ``(seed, split, index, size, ...)``
  through ``np.random.default_rng([seed, split id, index])`` (and the domain), never on how
  many images were generated. The same arguments, with the same numpy/OpenCV versions, give
  byte-identical files.

The module itself imports only numpy, OpenCV and pycocotools (no torch).
"""

from __future__ import annotations

import colorsys
import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

GENERATOR_VERSION = '1.1'  # 1.1: COCO category lists put the things first

STUFF_CLASSES = ('sky', 'building', 'vegetation', 'road')
THING_CLASSES = ('car', 'person', 'traffic sign', 'ball', 'cone')
CLASSES = STUFF_CLASSES + THING_CLASSES
PALETTE = (
    (70, 130, 180),  # sky
    (70, 70, 70),  # building
    (107, 142, 35),  # vegetation
    (128, 64, 128),  # road
    (0, 0, 142),  # car
    (220, 20, 60),  # person
    (220, 220, 0),  # traffic sign
    (0, 210, 210),  # ball
    (255, 120, 0),  # cone
)
SKY, BUILDING, VEGETATION, ROAD, CAR, PERSON, SIGN, BALL, CONE = range(len(CLASSES))
STUFF_IDS = tuple(range(len(STUFF_CLASSES)))
THING_IDS = tuple(range(len(STUFF_CLASSES), len(CLASSES)))
IGNORE_INDEX = 255

# Split name (the ADE20K folder name) -> id mixed into each image's random seed.
SPLITS = {'training': 0, 'validation': 1}
# Appearances of the same scenes: 'source' (the original look) and 'target' (a shifted one for
# domain adaptation; same labels).
DOMAINS = ('source', 'target')
_FILE_PREFIX = {'training': 'train', 'validation': 'val'}

_SHIFT = 4  # OpenCV drawing with 4 fractional bits: sub-pixel placement of small shapes
_ONE = 1 << _SHIFT


@dataclass
class Instance:
    """One visible thing instance.

    Attributes:
        class_id: Index into ``CLASSES`` (always one of ``THING_IDS``).
        mask: ``(H, W)`` bool, the pixels where the instance is visible.
    """

    class_id: int
    mask: np.ndarray


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        semantic: ``(H, W)`` uint8 class ids, every pixel in ``0..len(CLASSES)-1``.
        instances: Visible thing instances in drawing order (later ones were drawn on top).
    """

    image: np.ndarray
    semantic: np.ndarray
    instances: list[Instance] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Drawing helpers
# ------------------------------------------------------------------------------------------------


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


class _Layer:
    """An RGB drawing layer with a coverage mask; every shape drawn sets both.

    Shapes are drawn without anti-aliasing so that the mask is exactly the set of pixels whose
    colour the shape decided.
    """

    def __init__(self, height: int, width: int) -> None:
        self.rgb = np.zeros((height, width, 3), np.uint8)
        self.mask = np.zeros((height, width), np.uint8)

    def polygon(self, points: Sequence[Sequence[float]], color: Sequence[int]) -> None:
        pts = [_fixed(points).reshape(-1, 1, 2)]
        cv2.fillPoly(self.rgb, pts, _cv_color(color), cv2.LINE_8, _SHIFT)
        cv2.fillPoly(self.mask, pts, 1, cv2.LINE_8, _SHIFT)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Sequence[int]) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color)

    def circle(self, cx: float, cy: float, radius: float, color: Sequence[int]) -> None:
        center = tuple(int(v) for v in _fixed([cx, cy]))
        r = max(int(round(radius * _ONE)), _ONE // 2)
        cv2.circle(self.rgb, center, r, _cv_color(color), -1, cv2.LINE_8, _SHIFT)
        cv2.circle(self.mask, center, r, 1, -1, cv2.LINE_8, _SHIFT)

    def ellipse(
        self, cx: float, cy: float, ax: float, ay: float, angle: float, color: Sequence[int]
    ) -> None:
        center = tuple(int(v) for v in _fixed([cx, cy]))
        axes = (max(int(round(ax * _ONE)), _ONE // 2), max(int(round(ay * _ONE)), _ONE // 2))
        cv2.ellipse(self.rgb, center, axes, angle, 0, 360, _cv_color(color), -1, cv2.LINE_8, _SHIFT)
        cv2.ellipse(self.mask, center, axes, angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)

    def line(
        self, x0: float, y0: float, x1: float, y1: float, width: float, color: Sequence[int]
    ) -> None:
        # A thick line as a quad plus round caps: cv2.line's thickness is integer and unshifted.
        d = np.array([x1 - x0, y1 - y0], dtype=np.float64)
        n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6) * width / 2
        p0, p1 = np.array([x0, y0]), np.array([x1, y1])
        self.polygon([p0 + n, p1 + n, p1 - n, p0 - n], color)
        self.circle(x0, y0, width / 2, color)
        self.circle(x1, y1, width / 2, color)

    def rounded_rect(
        self, x0: float, y0: float, x1: float, y1: float, radius: float, color: Sequence[int]
    ) -> None:
        r = min(radius, (x1 - x0) / 2, (y1 - y0) / 2)
        self.rect(x0 + r, y0, x1 - r, y1, color)
        self.rect(x0, y0 + r, x1, y1 - r, color)
        for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            self.circle(cx, cy, r, color)


def _cv_color(color: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(c) for c in color)  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, color: Sequence[int], amount: float) -> tuple[int, ...]:
    jittered = np.asarray(color, np.float64) + rng.uniform(-amount, amount, 3)
    return tuple(int(v) for v in np.clip(jittered, 0, 255))


def _hsv(hue: float, sat: float, val: float) -> tuple[int, ...]:
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Unit-variance-ish noise with blobs about ``cell`` pixels wide, ``(H, W)`` float32."""
    height, width = shape
    grid = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _paint(canvas: np.ndarray, region: np.ndarray, texture: np.ndarray) -> None:
    canvas[region] = texture[region]


# ------------------------------------------------------------------------------------------------
# Background (stuff)
# ------------------------------------------------------------------------------------------------


def _draw_background(
    rng: np.random.Generator, height: int, width: int, look: _TargetLook | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Sky, road, buildings and vegetation: float32 RGB, uint8 labels and the horizon row.

    With ``look`` (the target domain) every texture is replaced by the target one, after the
    source one has taken its draws from ``rng``: the geometry that follows stays the same.
    """
    horizon = int(round(height * rng.uniform(0.35, 0.55)))
    image = np.zeros((height, width, 3), np.float32)
    labels = np.full((height, width), VEGETATION, np.uint8)
    labels[:horizon] = SKY
    image[:horizon] = _sky(rng, horizon, width, height, look)
    image[horizon:] = _grass(rng, height - horizon, width, height, look)
    _draw_road(rng, image, labels, horizon, look)
    _draw_buildings(rng, image, labels, horizon, look)
    _draw_tree_crowns(rng, image, labels, horizon, look)
    return image, labels, horizon


def _sky(
    rng: np.random.Generator, rows: int, width: int, height: int, look: _TargetLook | None
) -> np.ndarray:
    """A vertical gradient, lighter towards the horizon, with soft clouds."""
    top = np.array(_jitter(rng, (70, 120, 210), 25), np.float32)
    bottom = np.array(_jitter(rng, (170, 200, 235), 15), np.float32)
    t = np.arange(rows, dtype=np.float32)[:, None, None] / rows
    sky = top * (1 - t) + bottom * t + 5 * _smooth_noise(rng, (rows, width), height / 3)[..., None]
    clouds = np.clip(_smooth_noise(rng, (rows, width), height / 5) - rng.uniform(0.3, 1.2), 0, 1)
    if look is not None:
        return _target_sky(look, rows, width)
    return sky + clouds[..., None] * (245 - sky) * 0.8


def _grass(
    rng: np.random.Generator, rows: int, width: int, height: int, look: _TargetLook | None
) -> np.ndarray:
    """Green with fine grain and patches of darker and lighter growth."""
    grass = np.array(_jitter(rng, (80, 135, 55), 22), np.float32)
    grain = rng.normal(0, 9, (rows, width)).astype(np.float32)[..., None]
    patches = 14 * _smooth_noise(rng, (rows, width), height / 10)[..., None]
    if look is not None:
        return _target_grass(look, rows, width)
    return grass + grain * np.float32([0.8, 1.0, 0.6]) + patches


def _draw_road(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    horizon: int,
    look: _TargetLook | None,
) -> None:
    """A trapezoid converging on a vanishing point at the horizon, with lane markings."""
    height, width = labels.shape
    vanish_x = width * rng.uniform(0.3, 0.7)
    top_half = width * rng.uniform(0.01, 0.05)
    left_x = width * rng.uniform(-0.35, 0.25)
    right_x = width * rng.uniform(0.75, 1.35)
    outline = [(vanish_x - top_half, horizon), (vanish_x + top_half, horizon)]
    outline += [(right_x, height + 1), (left_x, height + 1)]
    road = _Layer(height, width)
    road.polygon(outline, (0, 0, 0))
    region = road.mask.astype(bool)

    gray = rng.uniform(75, 125)
    asphalt = np.array(_jitter(rng, (gray, gray, gray * 1.03), 6), np.float32)
    ground = (height - horizon, width)
    texture = asphalt + rng.normal(0, 5, ground).astype(np.float32)[..., None]
    texture += 6 * _smooth_noise(rng, ground, height / 6)[..., None]
    if look is not None:
        texture = _target_asphalt(look, ground)
    _paint(image[horizon:], region[horizon:], texture)
    labels[region] = ROAD

    def along(frac: float, t: float) -> tuple[float, float]:
        # The point a fraction ``frac`` across the road, ``t`` of the way from horizon to bottom.
        x_top = vanish_x + (2 * frac - 1) * top_half
        x_bottom = left_x + frac * (right_x - left_x)
        return x_top + t * (x_bottom - x_top), horizon + t * (height + 1 - horizon)

    marks = _Layer(height, width)
    paint = _jitter(rng, (235, 235, 225), 10) if rng.random() < 0.7 else (230, 190, 40)
    half = 0.012 * width

    def stripe(frac: float, t0: float, t1: float) -> None:
        (xa, ya), (xb, yb) = along(frac, t0), along(frac, t1)
        corners = [(xa - half * t0, ya), (xa + half * t0, ya)]
        corners += [(xb + half * t1, yb), (xb - half * t1, yb)]
        marks.polygon(corners, paint)

    t = rng.uniform(0.08, 0.2)
    while t < 1.05:  # dashes that lengthen towards the viewer, like a road in perspective
        stripe(0.5, t, t * 1.3)
        t *= 1.75
    if rng.random() < 0.6:
        stripe(0.08, 0.0, 1.05)
        stripe(0.92, 0.0, 1.05)
    # Markings are part of the road class: paint them only where the road is.
    marked = marks.mask.astype(bool) & region
    if look is not None:
        _target_markings(look, image, marked, marks.rgb)
    else:
        image[marked] = marks.rgb[marked]


def _draw_buildings(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    horizon: int,
    look: _TargetLook | None,
) -> None:
    """Blocks standing on the horizon with window grids; later blocks hide earlier ones."""
    height, width = labels.shape
    facades = ((150, 150, 150), (190, 170, 130), (150, 75, 55), (85, 110, 140), (110, 100, 90))
    for _ in range(rng.integers(1, 5)):
        bw = width * rng.uniform(0.12, 0.4)
        x0 = int(round(rng.uniform(-0.1 * width, width - 0.5 * bw)))
        x1 = int(round(x0 + bw))
        y0 = int(round(horizon * rng.uniform(0.05, 0.7)))
        xa, xb = max(x0, 0), min(x1, width)
        if xb <= xa or horizon <= y0:
            continue
        facade = np.array(_jitter(rng, facades[rng.integers(len(facades))], 18), np.float32)
        block = facade + rng.normal(0, 4, (horizon - y0, xb - xa)).astype(np.float32)[..., None]

        # Window grid: spacing and size vary per building; a random subset of windows is lit.
        sx = max(3.0, height * rng.uniform(0.05, 0.1))
        sy = max(3.0, height * rng.uniform(0.06, 0.11))
        fill = rng.uniform(0.4, 0.65)
        cols = np.arange(xa, xb) - x0 - 0.5 * sx * (1 - fill)
        rows = np.arange(y0, horizon) - y0 - 0.5 * sy * (1 - fill)
        in_col = (np.mod(cols, sx) < sx * fill) & (cols > 0) & (np.arange(xa, xb) < x1 - 1)
        in_row = (
            (np.mod(rows, sy) < sy * fill) & (rows > 0) & (np.arange(y0, horizon) < horizon - 2)
        )
        windows = in_row[:, None] & in_col[None, :]
        row_cell = (np.maximum(rows, 0) / sy).astype(int)
        col_cell = (np.maximum(cols, 0) / sx).astype(int)
        lit = (rng.random((row_cell.max() + 1, col_cell.max() + 1)) < 0.3)[
            row_cell[:, None], col_cell[None, :]
        ]
        block[windows & ~lit] = np.array(_jitter(rng, (45, 50, 60), 12), np.float32)
        block[windows & lit] = np.array(_jitter(rng, (215, 200, 120), 15), np.float32)
        if look is not None:
            block = _target_facade(look, block.shape[:2])
        image[y0:horizon, xa:xb] = block
        labels[y0:horizon, xa:xb] = BUILDING


def _draw_tree_crowns(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    horizon: int,
    look: _TargetLook | None,
) -> None:
    """Vegetation blobs along the horizon, over sky, buildings and the distant road."""
    height, width = labels.shape
    for _ in range(rng.integers(0, 4)):
        crown = _Layer(height, width)
        center = (rng.uniform(0, width), horizon - rng.uniform(0, 0.12) * height)
        axes = (width * rng.uniform(0.05, 0.14), height * rng.uniform(0.06, 0.16))
        crown.ellipse(*center, *axes, rng.uniform(-20, 20), (0, 0, 0))
        leaves = np.array(_jitter(rng, (45, 95, 40), 15), np.float32)
        texture = (
            leaves + 16 * _smooth_noise(rng, (height, width), max(height / 40, 1.5))[..., None]
        )
        if look is not None:
            texture = _target_leaves(look, (height, width))
        region = crown.mask.astype(bool)
        _paint(image, region, texture)
        labels[region] = VEGETATION


# ------------------------------------------------------------------------------------------------
# Things
# ------------------------------------------------------------------------------------------------

# (height at the bottom of the image relative to the image height, width / height)
_THING_SIZE = {
    CAR: (0.24, (1.8, 2.5)),
    PERSON: (0.4, (0.35, 0.45)),
    SIGN: (0.45, (0.45, 0.55)),
    BALL: (0.16, (1.0, 1.0)),
    CONE: (0.22, (0.6, 0.7)),
}
_CAR_COLORS = (
    (200, 30, 30),
    (30, 60, 170),
    (230, 230, 230),
    (30, 30, 35),
    (165, 170, 175),
    (230, 190, 30),
    (40, 120, 60),
    (230, 110, 20),
)


def _draw_car(rng: np.random.Generator, layer: _Layer, x: float, y: float, h: float, w: float):
    body = _jitter(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 25)
    glass = _jitter(rng, (120, 150, 170), 20)
    facing = 1 if rng.random() < 0.5 else -1
    # Cabin: a trapezoid set back from the front.
    cab_back, cab_front = x - facing * 0.38 * w, x + facing * 0.2 * w
    cab = [
        (cab_back, y - 0.58 * h),
        (cab_back + facing * 0.1 * w, y - h),
        (cab_front - facing * 0.12 * w, y - h),
        (cab_front, y - 0.58 * h),
    ]
    layer.polygon(cab, body)
    # Windows: the cabin shrunk towards its centre, open at the bottom edge.
    inset = 0.1 * h
    (bx, by), (tbx, tby), (tfx, tfy), (fx, fy) = cab
    window = [
        (bx + facing * inset, by),
        (tbx + facing * inset, tby + inset),
        (tfx - facing * inset, tfy + inset),
        (fx - facing * inset, fy),
    ]
    layer.polygon(window, glass)
    layer.rounded_rect(x - w / 2, y - 0.62 * h, x + w / 2, y - 0.16 * h, 0.14 * h, body)
    lamp_x = x + facing * (w / 2 - 0.06 * h)
    layer.circle(lamp_x, y - 0.45 * h, 0.05 * h, _jitter(rng, (250, 230, 150), 5))
    for wx in (x - 0.3 * w, x + 0.3 * w):
        layer.circle(wx, y - 0.17 * h, 0.17 * h, _jitter(rng, (25, 25, 25), 8))
        layer.circle(wx, y - 0.17 * h, 0.07 * h, _jitter(rng, (150, 150, 150), 20))


def _draw_person(rng: np.random.Generator, layer: _Layer, x: float, y: float, h: float, w: float):
    skin = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95))
    shirt = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
    pants = _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.15, 0.6))
    limb = max(0.07 * h, 1.0)
    stride = rng.uniform(0.0, 0.1) * h
    layer.line(x - 0.05 * h, y - 0.46 * h, x - 0.04 * h - stride, y - limb / 2, limb, pants)
    layer.line(x + 0.05 * h, y - 0.46 * h, x + 0.04 * h + stride, y - limb / 2, limb, pants)
    swing = rng.uniform(-0.1, 0.1) * h
    for side in (-1, 1):
        layer.line(
            x + side * 0.13 * h,
            y - 0.74 * h,
            x + side * 0.17 * h + swing,
            y - 0.48 * h,
            0.75 * limb,
            shirt,
        )
    layer.ellipse(x, y - 0.62 * h, 0.15 * h, 0.2 * h, 0, shirt)
    layer.circle(x, y - 0.9 * h, 0.095 * h, skin)


def _draw_sign(rng: np.random.Generator, layer: _Layer, x: float, y: float, h: float, w: float):
    pole = _jitter(rng, (140, 140, 145), 20)
    layer.line(x, y - 0.75 * h, x, y - 0.01 * h, max(0.035 * h, 1.0), pole)
    cy, r = y - 0.78 * h, w / 2
    kind = rng.integers(4)
    rim = max(0.18 * r, 0.6)
    if kind == 0:  # warning triangle: red rim, white face
        tri = np.array([(0, -1.0), (0.87, 0.5), (-0.87, 0.5)])
        layer.polygon(tri * r + (x, cy), _jitter(rng, (200, 25, 30), 20))
        layer.polygon(tri * (r - 2 * rim) + (x, cy), _jitter(rng, (235, 235, 230), 12))
    elif kind == 1:  # prohibition disc: red rim, white face
        layer.circle(x, cy, r, _jitter(rng, (200, 25, 30), 20))
        layer.circle(x, cy, r - rim, _jitter(rng, (235, 235, 230), 12))
    elif kind == 2:  # mandatory disc: blue with a white arrow bar
        layer.circle(x, cy, r, _jitter(rng, (30, 70, 170), 20))
        layer.rect(x - 0.15 * r, cy - 0.55 * r, x + 0.15 * r, cy + 0.55 * r, (235, 235, 235))
    else:  # priority diamond: yellow face, white rim
        diamond = np.array([(0, -1.0), (1.0, 0), (0, 1.0), (-1.0, 0)])
        layer.polygon(diamond * r + (x, cy), _jitter(rng, (235, 235, 230), 12))
        layer.polygon(diamond * (r - 1.5 * rim) + (x, cy), _jitter(rng, (235, 190, 30), 20))


def _draw_ball(rng: np.random.Generator, layer: _Layer, x: float, y: float, h: float, w: float):
    r = h / 2
    color = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    layer.circle(x, y - r, r, color)
    if rng.random() < 0.6:  # a band around the ball, seen at an angle
        band = _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.7, 1.0))
        layer.ellipse(x, y - r, 0.95 * r, 0.25 * r, rng.uniform(-60, 60), band)
    layer.circle(x - 0.35 * r, y - 1.35 * r, 0.2 * r, (250, 250, 250))


def _draw_cone(rng: np.random.Generator, layer: _Layer, x: float, y: float, h: float, w: float):
    orange = _hsv(rng.uniform(0.0, 0.09), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    base_h = 0.1 * h
    layer.rect(x - w / 2, y - base_h, x + w / 2, y, tuple(int(c * 0.8) for c in orange))
    top_half, bottom_half = 0.07 * w, 0.38 * w
    layer.polygon(
        [
            (x - top_half, y - h),
            (x + top_half, y - h),
            (x + bottom_half, y - base_h),
            (x - bottom_half, y - base_h),
        ],
        orange,
    )
    white = _jitter(rng, (240, 240, 240), 10)
    for t0, t1 in ((0.3, 0.45), (0.6, 0.72))[: rng.integers(1, 3)]:
        ya, yb = y - base_h - t1 * (h - base_h), y - base_h - t0 * (h - base_h)
        ha = bottom_half + (top_half - bottom_half) * t1
        hb = bottom_half + (top_half - bottom_half) * t0
        layer.polygon([(x - ha, ya), (x + ha, ya), (x + hb, yb), (x - hb, yb)], white)


_THING_DRAWERS: dict[int, Callable[..., None]] = {
    CAR: _draw_car,
    PERSON: _draw_person,
    SIGN: _draw_sign,
    BALL: _draw_ball,
    CONE: _draw_cone,
}


def _draw_things(
    rng: np.random.Generator,
    height: int,
    width: int,
    horizon: int,
    count: int,
    look: _TargetLook | None = None,
) -> list[tuple[int, _Layer]]:
    """Draws ``count`` things on separate layers, sorted far to near (drawing order)."""
    placed: list[tuple[float, int, _Layer]] = []
    anchors: list[tuple[float, float, float]] = []
    ground = height - horizon
    for _ in range(count):
        class_id = THING_IDS[rng.integers(len(THING_IDS))]
        rel_height, aspect_range = _THING_SIZE[class_id]
        if anchors and rng.random() < 0.5:
            # Next to an earlier object, so that instances overlap often.
            ax, ay, aw = anchors[rng.integers(len(anchors))]
            x = ax + rng.uniform(-0.7, 0.7) * aw
            y = float(
                np.clip(
                    ay + rng.uniform(-0.12, 0.12) * ground, horizon + 0.15 * ground, height * 1.03
                )
            )
        else:
            x = rng.uniform(0.03, 0.97) * width
            y = horizon + rng.uniform(0.15, 1.03) * ground
        depth = (y - horizon) / ground  # objects further away (closer to the horizon) look smaller
        h = rel_height * height * (0.5 + 0.8 * depth) * rng.uniform(0.85, 1.2)
        w = h * rng.uniform(*aspect_range)
        layer = _Layer(height, width)
        _THING_DRAWERS[class_id](rng, layer, x, y, h, w)
        _shade(rng, layer, y - h, h)
        if look is not None:
            _target_material(look, layer)
        placed.append((y, class_id, layer))
        anchors.append((x, y, w))
    placed.sort(key=lambda item: item[0])  # painter's order: nearer objects cover farther ones
    return [(class_id, layer) for _, class_id, layer in placed]


def _shade(rng: np.random.Generator, layer: _Layer, top: float, h: float) -> None:
    """Lighting: an overall gain and a top-to-bottom falloff, plus a little grain."""
    ys, xs = np.nonzero(layer.mask)
    if len(ys) == 0:
        return
    gain = rng.uniform(0.85, 1.1) - rng.uniform(0.0, 0.25) * (ys - top) / max(h, 1.0)
    grain = rng.normal(0, 4, (len(ys), 1))
    shaded = layer.rgb[ys, xs].astype(np.float32) * gain[:, None] + grain
    layer.rgb[ys, xs] = np.clip(shaded, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# The target domain's look
# ------------------------------------------------------------------------------------------------


class _TargetLook:
    """The target domain's look for one image: its own generator and per-image material choices.

    Every target-only draw comes from ``rng``, a generator independent of the scene's, so the
    scene's generator takes exactly the draws it takes in the source domain and lays out the
    same geometry: the two domains share their labels pixel for pixel.

    Args:
        rng: The target look's generator.
        height: Image height; texture scales and blur widths follow it.
    """

    def __init__(self, rng: np.random.Generator, height: int) -> None:
        self.rng = rng
        self.scale = height / 128
        # Things: paints muted and hue-shifted alike within the image (like one camera's colour).
        self.saturation = rng.uniform(0.35, 0.65)
        self.hue_shift = rng.uniform(-15, 15)  # degrees
        # The sun's side (-1 left, 1 right): shades things and casts their shadows.
        self.light = 1.0 if rng.random() < 0.5 else -1.0

    @classmethod
    def for_scene(cls, rng: np.random.Generator, height: int) -> _TargetLook:
        # Seeded from a copy of the scene's generator: deterministic, and ``rng`` itself is left
        # untouched (its next draw is still the source domain's).
        key = int(copy.deepcopy(rng).integers(2**63))
        return cls(np.random.default_rng([key, 0x7A26E7]), height)

    def noise(
        self, shape: tuple[int, int], cell_y: float, cell_x: float | None = None
    ) -> np.ndarray:
        """Smooth noise like :func:`_smooth_noise`, blobs ``cell_y`` tall and ``cell_x`` wide."""
        height, width = shape
        cell_x = cell_y if cell_x is None else cell_x
        rows, cols = int(height / cell_y) + 2, int(width / cell_x) + 2
        grid = self.rng.standard_normal((rows, cols), dtype=np.float32)
        return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)

    def grain(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Independent Gaussian noise per element, float32."""
        return self.rng.normal(0, sigma, shape).astype(np.float32)


def _target_sky(look: _TargetLook, rows: int, width: int) -> np.ndarray:
    """Overcast: a pale, nearly grey gradient under grey bands of stratus."""
    rng, s = look.rng, look.scale
    hue = rng.uniform(0.5, 0.65)
    top = np.array(_hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.6, 0.85)), np.float32)
    bottom = np.array(_hsv(hue, rng.uniform(0.0, 0.1), rng.uniform(0.85, 0.97)), np.float32)
    t = np.arange(rows, dtype=np.float32)[:, None, None] / max(rows, 1)
    sky = top * (1 - t) + bottom * t
    bands = look.noise((rows, width), 5 * s, 40 * s) + 0.5 * look.noise(
        (rows, width), 2 * s, 12 * s
    )
    cover = np.clip(bands - rng.uniform(-0.3, 0.6), 0, 1)[..., None]
    tone = np.float32(rng.uniform(140, 200))
    return sky + cover * (tone - sky) * 0.7 + look.grain((rows, width, 1), 2)


def _target_grass(look: _TargetLook, rows: int, width: int) -> np.ndarray:
    """Dry, olive ground cover: vertical blades, and patches of bare soil."""
    rng, s = look.rng, look.scale
    grass = np.array(
        _hsv(rng.uniform(0.18, 0.28), rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.5)), np.float32
    )
    soil = np.array(_jitter(rng, (115, 95, 70), 15), np.float32)
    blades = 18 * look.noise((rows, width), 3 * s, max(0.7 * s, 1.0))[..., None]
    bare = np.clip(look.noise((rows, width), 12 * s) - rng.uniform(0.6, 1.4), 0, 1)[..., None]
    return grass * (1 - bare) + soil * bare + blades + look.grain((rows, width, 1), 5)


def _target_asphalt(look: _TargetLook, ground: tuple[int, int]) -> np.ndarray:
    """Darker, worn asphalt with a cool or warm tint, coarse grain and repair patches."""
    rng, s = look.rng, look.scale
    gray = rng.uniform(55, 100)
    asphalt = np.array([gray * rng.uniform(0.92, 1.04), gray, gray * rng.uniform(1.0, 1.12)])
    texture = asphalt.astype(np.float32) + look.grain((*ground, 1), 8)
    texture += 10 * look.noise(ground, 2 * s)[..., None]
    patches = look.noise(ground, 10 * s) > rng.uniform(0.6, 1.4)
    texture[patches] *= np.float32(rng.uniform(0.7, 0.85))
    return texture


def _target_markings(
    look: _TargetLook, image: np.ndarray, marked: np.ndarray, paint: np.ndarray
) -> None:
    """Worn paint: the markings only partly cover the asphalt, unevenly."""
    height, width = marked.shape
    wear = np.clip(
        look.rng.uniform(0.35, 0.7) + 0.25 * look.noise((height, width), 2 * look.scale), 0, 1
    )
    w = wear[marked][:, None]
    image[marked] = image[marked] * (1 - w) + paint[marked].astype(np.float32) * w


def _target_facade(look: _TargetLook, shape: tuple[int, int]) -> np.ndarray:
    """Plaster, brick or concrete with weathering streaks and floor lines, no window grid."""
    rng, s = look.rng, look.scale
    facades = ((200, 190, 170), (175, 160, 150), (150, 105, 85), (120, 122, 125), (85, 90, 95))
    facade = np.array(_jitter(rng, facades[rng.integers(len(facades))], 15), np.float32)
    block = facade + 12 * look.noise(shape, 20 * s, 1.5 * s)[..., None]  # rain streaks
    block += 8 * look.noise(shape, 8 * s)[..., None] + look.grain((*shape, 1), 5)
    floor = max(rng.uniform(6, 12) * s, 3.0)
    lines = np.mod(np.arange(shape[0]) + rng.uniform(0, floor), floor) < max(s, 1.0)
    block[lines] *= np.float32(rng.uniform(0.75, 0.9))
    return block


def _target_leaves(look: _TargetLook, shape: tuple[int, int]) -> np.ndarray:
    """Dark, blue- or yellow-tinged foliage in clumps with deep shadow between them."""
    rng, s = look.rng, look.scale
    leaves = np.array(
        _hsv(rng.uniform(0.17, 0.33), rng.uniform(0.3, 0.6), rng.uniform(0.22, 0.4)), np.float32
    )
    clumps = np.clip(look.noise(shape, 2.5 * s) + 0.5, 0, 1.5)[..., None]
    return leaves * (0.55 + 0.45 * clumps) + 10 * look.noise(shape, 0.8 * s + 0.5)[..., None]


def _target_material(look: _TargetLook, layer: _Layer) -> None:
    """Muted, slightly hue-shifted paints with a matte grain, lit from the sun's side."""
    ys, xs = np.nonzero(layer.mask)
    if len(ys) == 0:
        return
    rng = look.rng
    rgb = layer.rgb[ys, xs].astype(np.float32)[:, None, :] / 255
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + look.hue_shift + rng.uniform(-10, 10), 360)
    hsv[..., 1] *= look.saturation * rng.uniform(0.8, 1.2)
    hsv[..., 2] = hsv[..., 2] * rng.uniform(0.7, 0.9) + 0.03
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[:, 0] * 255
    across = (xs - xs.mean()) / max(float(np.ptp(xs)), 1.0)  # -0.5 .. 0.5
    grime = look.noise(layer.mask.shape, 1.5 * look.scale)[ys, xs]
    out *= (1 + 0.45 * look.light * across + 0.08 * grime)[:, None]
    out += rng.normal(0, 5, (len(ys), 1))
    layer.rgb[ys, xs] = np.clip(out, 0, 255).astype(np.uint8)


def _target_shadows(look: _TargetLook, image: np.ndarray, masks: Sequence[np.ndarray]) -> None:
    """Soft contact shadows on the ground beside each thing, away from the sun."""
    height, width = image.shape[:2]
    shadow = _Layer(height, width)
    for mask in masks:
        ys, xs = np.nonzero(mask)
        x0, x1, bottom = xs.min(), xs.max() + 1, ys.max() + 1
        half = 0.5 * (x1 - x0)
        cx = 0.5 * (x0 + x1) - look.light * 0.35 * half
        shadow.ellipse(cx, bottom - 0.05 * half, 1.1 * half, 0.18 * half + 0.5, 0, (0, 0, 0))
    soft = cv2.GaussianBlur(shadow.mask.astype(np.float32), (0, 0), 1.2 * look.scale)
    image *= (1 - look.rng.uniform(0.35, 0.55) * soft)[..., None]


def _target_camera(look: _TargetLook, image: np.ndarray) -> np.ndarray:
    """Lens blur and vignetting, a white balance error, sensor noise and a flat tone curve."""
    rng, s = look.rng, look.scale
    height, width = image.shape[:2]
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.7, 1.1) * s)
    yy = (np.arange(height, dtype=np.float32)[:, None] - height / 2) / (height / 2)
    xx = (np.arange(width, dtype=np.float32)[None, :] - width / 2) / (width / 2)
    image *= (1 - rng.uniform(0.1, 0.25) * (xx**2 + yy**2) / 2)[..., None]
    cast = np.array([1.05, 1.01, 0.9], np.float32) * np.exp(rng.normal(0, 0.03, 3))
    image = image * cast.astype(np.float32)
    shot = np.sqrt(np.maximum(image, 0)) * rng.uniform(0.4, 0.8)
    image += shot * rng.standard_normal(image.shape, dtype=np.float32)
    image += rng.normal(0, rng.uniform(3, 6), image.shape).astype(np.float32)
    lift = rng.uniform(2, 8)
    return lift + image * np.float32(rng.uniform(0.85, 0.97))


# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------


def default_min_instance_area(size: tuple[int, int]) -> int:
    """Instances with fewer visible pixels are dropped: 0.2% of the image, at least 8 pixels."""
    return max(8, round(0.002 * size[0] * size[1]))


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 128),
    *,
    things_per_image: tuple[int, int] = (2, 7),
    min_instance_area: int | None = None,
    domain: str = 'source',
) -> Scene:
    """Renders one scene from a random generator.

    Args:
        rng: The only source of randomness. In the ``'target'`` domain the look's own generator
            is seeded from a copy of it, so ``rng`` advances exactly as in the source domain.
        size: ``(H, W)`` in pixels, each at least 32.
        things_per_image: Inclusive range of the number of thing instances *drawn*; some may then
            be dropped as almost fully hidden.
        min_instance_area: Instances with fewer visible pixels are not drawn at all (default:
            :func:`default_min_instance_area`).
        domain: ``'source'`` or ``'target'``: the appearance. Both render the same scene (the
            same semantic map and instances from the same ``rng`` state); see the module
            docstring for what the target look changes.

    Returns:
        The scene; its semantic map and instance masks agree pixel for pixel.

    Raises:
        ValueError: ``domain`` is unknown.
    """
    _check_domain(domain)
    height, width = size
    if min_instance_area is None:
        min_instance_area = default_min_instance_area(size)
    look = _TargetLook.for_scene(rng, height) if domain == 'target' else None
    image, semantic, horizon = _draw_background(rng, height, width, look)
    count = int(rng.integers(*things_per_image, endpoint=True))
    layers = _draw_things(rng, height, width, horizon, count, look)

    # Decide visibility top-down: an instance's visible area only depends on the kept ones above
    # it, so dropping a nearly hidden one never changes what the others show.
    covered = np.zeros((height, width), bool)
    kept: list[tuple[int, _Layer, np.ndarray]] = []
    for class_id, layer in reversed(layers):
        full = layer.mask.astype(bool)
        visible = full & ~covered
        if visible.sum() >= min_instance_area:
            kept.append((class_id, layer, visible))
            covered |= full
    kept.reverse()
    if look is not None:
        _target_shadows(look, image, [layer.mask for _, layer, _ in kept])

    instances = []
    for class_id, layer, visible in kept:
        image[visible] = layer.rgb[visible]
        semantic[visible] = class_id
        instances.append(Instance(class_id, visible))

    image += rng.normal(0, rng.uniform(1.5, 4.0), image.shape).astype(np.float32)
    if look is not None:
        image = _target_camera(look, image)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image=image, semantic=semantic, instances=instances)


def make_scene(
    split: str,
    index: int,
    *,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    things_per_image: tuple[int, int] = (2, 7),
    min_instance_area: int | None = None,
    domain: str = 'source',
) -> Scene:
    """Renders image ``index`` of ``split`` exactly as :func:`generate_shapes` writes it.

    Args:
        split: ``'training'`` or ``'validation'``.
        index: 0-based index within the split.
        size: ``(H, W)``.
        seed: Dataset seed.
        things_per_image: See :func:`render_scene`.
        min_instance_area: See :func:`render_scene`.
        domain: ``'source'`` or ``'target'``; the labels do not depend on it.

    Returns:
        The scene, independent of any other image.
    """
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; expected one of {sorted(SPLITS)}')
    rng = np.random.default_rng([seed, SPLITS[split], index])
    return render_scene(
        rng,
        size,
        things_per_image=things_per_image,
        min_instance_area=min_instance_area,
        domain=domain,
    )


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f'unknown domain {domain!r}; expected one of {list(DOMAINS)}')


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode('.png', array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f'could not encode {path}')
    path.write_bytes(data.tobytes())


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def _categories(things_only: bool) -> list[dict]:
    # Things first: mmdet numbers the classes of a COCO JSON in its category order, and its
    # panoptic heads need thing labels below stuff labels. Ids stay class id + 1.
    return [
        {
            'id': class_id + 1,
            'name': CLASSES[class_id],
            'supercategory': 'thing' if class_id in THING_IDS else 'stuff',
            'isthing': int(class_id in THING_IDS),
            'color': list(PALETTE[class_id]),
        }
        for class_id in (*THING_IDS, *STUFF_IDS)
        if not things_only or class_id in THING_IDS
    ]


def _write_split(root: Path, split: str, num_images: int, scene_kwargs: dict) -> dict:
    prefix = _FILE_PREFIX[split]
    img_dir = root / 'images' / split
    sem_dir = root / 'annotations' / split
    pan_dir = root / 'annotations' / f'panoptic_{split}'
    for folder in (img_dir, sem_dir, pan_dir):
        folder.mkdir(parents=True)
    images, instance_anns, panoptic_anns = [], [], []
    per_class = dict.fromkeys(THING_CLASSES, 0)
    for index in range(num_images):
        scene = make_scene(split, index, **scene_kwargs)
        height, width = scene.semantic.shape
        image_id = index + 1
        name = f'{prefix}_{index:06d}.png'
        _write_png(img_dir / name, scene.image)
        _write_png(sem_dir / name, scene.semantic)
        images.append({'id': image_id, 'file_name': name, 'height': height, 'width': width})

        segment_ids = np.zeros((height, width), np.uint32)
        segments = []
        for stuff_id in STUFF_IDS:
            region = scene.semantic == stuff_id
            if region.any():
                segment_ids[region] = stuff_id + 1
                segments.append((stuff_id + 1, stuff_id, region))
        for n, inst in enumerate(scene.instances, start=1):
            category_id = inst.class_id + 1
            segment_ids[inst.mask] = category_id * 1000 + n
            segments.append((category_id * 1000 + n, inst.class_id, inst.mask))
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            instance_anns.append(
                {
                    'id': len(instance_anns) + 1,
                    'image_id': image_id,
                    'category_id': category_id,
                    'segmentation': {
                        'size': [height, width],
                        'counts': rle['counts'].decode('ascii'),
                    },
                    'area': int(inst.mask.sum()),
                    'bbox': _bbox(inst.mask),
                    'iscrowd': 0,
                }
            )
            per_class[CLASSES[inst.class_id]] += 1
        _write_png(pan_dir / name, _id_to_rgb(segment_ids))
        panoptic_anns.append(
            {
                'image_id': image_id,
                'file_name': name,
                'segments_info': [
                    {
                        'id': seg_id,
                        'category_id': class_id + 1,
                        'area': int(region.sum()),
                        'bbox': _bbox(region),
                        'iscrowd': 0,
                    }
                    for seg_id, class_id, region in segments
                ],
            }
        )

    info = {'description': f'effvision synthetic shapes, {split}', 'version': GENERATOR_VERSION}
    instances_json = {
        'info': info,
        'images': images,
        'annotations': instance_anns,
        'categories': _categories(things_only=True),
    }
    panoptic_json = {
        'info': info,
        'images': images,
        'annotations': panoptic_anns,
        'categories': _categories(things_only=False),
    }
    for filename, content in (
        (f'instances_{split}.json', instances_json),
        (f'panoptic_{split}.json', panoptic_json),
    ):
        with open(root / 'annotations' / filename, 'w') as f:
            json.dump(content, f, separators=(',', ':'))
    return {'images': num_images, 'instances': len(instance_anns), 'instances_per_class': per_class}


def generate_shapes(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 400,
    num_val: int = 60,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    things_per_image: tuple[int, int] = (2, 7),
    min_instance_area: int | None = None,
    domain: str = 'source',
    force: bool = False,
) -> dict:
    """Writes the shapes dataset (semantic, COCO instance and COCO panoptic annotations).

    The dataset is written into ``<out_dir>.tmp-<pid>`` and renamed into place at the end, so an
    interrupted run never leaves a half-written ``out_dir`` behind.

    Args:
        out_dir: Dataset root to create, e.g. ``data/shapes``.
        num_train: Number of training images.
        num_val: Number of validation images.
        size: ``(H, W)`` of every image, each at least 32.
        seed: Dataset seed; image ``i`` of a split depends only on ``(seed, split, i)`` and the
            rendering arguments.
        things_per_image: Inclusive range of thing instances drawn per image.
        min_instance_area: Minimum visible pixels of a kept instance (default:
            :func:`default_min_instance_area`).
        domain: ``'source'`` (the default look) or ``'target'`` (the shifted look for domain
            adaptation). Only the images differ: the label PNGs and JSON files of the two
            domains are byte-identical for the same other arguments.
        force: Replace an existing non-empty ``out_dir``.

    Returns:
        The content of ``meta.json``.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty, and ``force`` is false.
        ValueError: An argument is out of range.
    """
    height, width = (int(v) for v in size)
    lo, hi = (int(v) for v in things_per_image)
    if min(height, width) < 32:
        raise ValueError(f'size must be at least 32x32, got {height}x{width}')
    if num_train < 0 or num_val < 0:
        raise ValueError(f'image counts must be >= 0, got {num_train=} {num_val=}')
    if not 0 <= lo <= hi:
        raise ValueError(f'things_per_image must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}')
    _check_domain(domain)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f'{out} exists and is not a directory')
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f'{out} already exists and is not empty; pass force=True (--force on the command '
            'line) to replace it'
        )

    if min_instance_area is None:
        min_instance_area = default_min_instance_area((height, width))
    scene_kwargs = {
        'size': (height, width),
        'seed': int(seed),
        'things_per_image': (lo, hi),
        'min_instance_area': int(min_instance_area),
        'domain': domain,
    }
    meta = {
        'name': 'shapes',
        'generator_version': GENERATOR_VERSION,
        'domain': domain,
        'arguments': {'num_train': num_train, 'num_val': num_val, **scene_kwargs},
        'classes': list(CLASSES),
        'palette': [list(c) for c in PALETTE],
        'stuff_classes': list(STUFF_CLASSES),
        'thing_classes': list(THING_CLASSES),
        'stuff_ids': list(STUFF_IDS),
        'thing_ids': list(THING_IDS),
        'ignore_index': IGNORE_INDEX,
        'label_convention': 'semantic PNGs hold class ids 0..K-1 (reduce_zero_label=False); '
        '255 is ignore and never written; COCO category id = class id + 1; image id = index + 1',
        'counts': {},
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f'{out.name}.tmp-{os.getpid()}'
    if tmp.exists():  # left over by an earlier, killed process with the same pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for split, count in (('training', num_train), ('validation', num_val)):
            meta['counts'][split] = _write_split(tmp, split, count, scene_kwargs)
        # meta.json last: a dataset root that has it was written completely.
        (tmp / 'meta.json').write_text(json.dumps(meta, indent=2) + '\n')
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f'{out.name}.old-{os.getpid()}'
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)
