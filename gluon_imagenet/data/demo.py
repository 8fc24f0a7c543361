"""A small learnable image dataset in the ImageNet layout, drawn procedurally (no download).

    python -m gluon_imagenet.data.demo OUT --train-per-class 120 --val-per-class 30

Ten classes of shapes (disc, square, triangle, cross, ring, star, bars, grid, ellipse, diamond), each drawn at a
random position, scale, rotation and colour over a random textured background, saved as JPEGs of a few hundred
pixels: OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg. Learnable, but not from colour or size alone.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import cv2
import numpy as np

CLASSES = ("bars", "cross", "diamond", "disc", "ellipse", "grid", "ring", "square", "star", "triangle")


def _polygon(center, radius, angle, points, inner=None):
    out = []
    for k in range(points * (2 if inner else 1)):
        r = radius if not inner or k % 2 == 0 else radius * inner
        a = angle + 2 * math.pi * k / (points * (2 if inner else 1))
        out.append((center[0] + r * math.cos(a), center[1] + r * math.sin(a)))
    return np.array(out, np.int32)


def draw_shape(image: np.ndarray, shape: str, rng: np.random.Generator) -> None:
    h, w = image.shape[:2]
    radius = rng.uniform(0.25, 0.42) * min(h, w)
    center = (rng.uniform(radius, w - radius), rng.uniform(radius, h - radius))
    angle = rng.uniform(0, 2 * math.pi)
    color = shape_colour(rng)
    c = tuple(int(v) for v in center)
    thick = max(2, int(radius * 0.18))
    if shape == "disc":
        cv2.circle(image, c, int(radius), color, -1, cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(image, c, int(radius), color, thick, cv2.LINE_AA)
    elif shape == "ellipse":
        cv2.ellipse(image, c, (int(radius), int(radius * 0.45)), math.degrees(angle), 0, 360, color, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.fillPoly(image, [_polygon(center, radius, angle, 4)], color, cv2.LINE_AA)
    elif shape == "diamond":
        pts = _polygon(center, radius, 0, 4).astype(np.float64)
        pts[:, 0] = center[0] + (pts[:, 0] - center[0]) * 0.55
        cv2.fillPoly(image, [pts.astype(np.int32)], color, cv2.LINE_AA)
    elif shape == "triangle":
        cv2.fillPoly(image, [_polygon(center, radius, angle, 3)], color, cv2.LINE_AA)
    elif shape == "star":
        cv2.fillPoly(image, [_polygon(center, radius, angle, 5, inner=0.4)], color, cv2.LINE_AA)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            d = (radius * math.cos(a), radius * math.sin(a))
            cv2.line(image, (int(c[0] - d[0]), int(c[1] - d[1])), (int(c[0] + d[0]), int(c[1] + d[1])), color, thick,
                     cv2.LINE_AA)
    elif shape in ("bars", "grid"):
        gap = radius / 2
        for a in ((angle, angle + math.pi / 2) if shape == "grid" else (angle,)):
            along, across = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
            for k in (-1.5, -0.5, 0.5, 1.5):
                o = (center[0] + across[0] * k * gap, center[1] + across[1] * k * gap)
                p1 = (int(o[0] - along[0] * radius), int(o[1] - along[1] * radius))
                p2 = (int(o[0] + along[0] * radius), int(o[1] + along[1] * radius))
                cv2.line(image, p1, p2, color, max(2, thick // 2), cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def textured_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A muted colour gradient with blurred and fine noise: texture for JPEG, but the shape stands out."""
    base = rng.integers(70, 186, (2, 2, 3)).astype(np.float32)
    image = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
    noise = rng.normal(0, 18, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    image += cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 5, (h, w, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour, very dark or very bright: always in contrast with the muted background."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(170, 256), rng.choice([rng.integers(0, 50),
                                                                                  rng.integers(225, 256)])]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def make_image(shape: str, rng: np.random.Generator, size: tuple[int, int] | None = None) -> np.ndarray:
    h, w = size or (int(rng.integers(180, 300)), int(rng.integers(180, 300)))
    image = textured_background(h, w, rng)
    draw_shape(image, shape, rng)
    return image


def generate(out: str, train_per_class: int, val_per_class: int, seed: int = 0, size=None,
             classes=CLASSES, quality: int = 92) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for shape in classes:
            folder = os.path.join(out, split, shape)
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                path = os.path.join(folder, f"{shape}_{k:05d}.jpg")
                cv2.imwrite(path, make_image(shape, rng, size), [cv2.IMWRITE_JPEG_QUALITY, quality])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gluon_imagenet.data.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--classes", type=int, default=len(CLASSES), help=f"how many of the {len(CLASSES)} shapes")
    p.add_argument("--width", type=int, default=0, help="fixed image width (default: random 180-300)")
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 1 <= a.classes <= len(CLASSES):
        p.error(f"--classes {a.classes}: must be 1..{len(CLASSES)}")
    size = (a.height, a.width) if a.width and a.height else None
    generate(a.out, a.train_per_class, a.val_per_class, a.seed, size, CLASSES[:a.classes])
    print(f"wrote {a.classes} classes x ({a.train_per_class} train + {a.val_per_class} val) images under {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
