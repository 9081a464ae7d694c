"""Offline images and task metrics for bench_zoo.py: photos cropped, scaled and flipped; text and shapes drawn by PIL.

Metrics compare with the fp32 model (stored as the eval "labels"), so they need no human labels:
- detector: box F1 at IoU >= 0.5, same class, after score threshold and per-class NMS (YOLOv8 head decoded here);
- classifier: top-1 agreement (labels = fp32 argmax, metric `accuracy`) and cosine.
"""

from __future__ import annotations

import numpy as np

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "invoice",
    "total",
    "2024",
    "model",
    "runtime",
    "order",
    "page",
]


def crops(images, n: int, size: int, seed: int, smallest: float = 0.3) -> list:
    """n random crops (a fraction `smallest`..1 of each side), half of them mirrored, resized to size x size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        w, h = im.size
        s = rng.uniform(smallest, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        c = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(c.resize((size, size), Image.BILINEAR))
    return out


def sample_photos() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def text_pages(n: int, size: int, seed: int) -> list:
    """Pages of rendered words and boxes, rotated by 0/90/180/270 degrees (what an orientation classifier sees)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            font = ImageFont.truetype(FONT, int(rng.integers(14, 40)))
            xy = (int(rng.integers(0, size // 2)), int(rng.integers(0, size - 40)))
            d.text(xy, " ".join(rng.choice(WORDS, 3)), fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        for _ in range(int(rng.integers(0, 3))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
            box = (x0, y0, x0 + int(rng.integers(10, 80)), y0 + int(rng.integers(10, 80)))
            d.rectangle(box, outline=tuple(int(v) for v in rng.integers(0, 255, 3)), width=2)
        out.append(im.rotate(int(rng.choice([0, 90, 180, 270]))))
    return out


def to_unit_nchw(images) -> np.ndarray:
    return np.stack([np.asarray(i, np.float32).transpose(2, 0, 1) / 255.0 for i in images])


def to_imagenet_nchw(images) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return np.stack([(np.asarray(i, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std for i in images])


# ------------------------------------------------------------------ detector metric
CONF, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None] - inter + 1e-9)


def decode_yolov8(head: np.ndarray, conf: float = CONF, iou: float = NMS_IOU):
    """One image's YOLOv8 head (4 + classes, anchors): cx, cy, w, h then class scores -> boxes, scores, classes."""
    p = head.T
    scores = p[:, 4:]
    cls, score = scores.argmax(1), scores.max(1)
    keep = score >= conf
    p, cls, score = p[keep], cls[keep], score[keep]
    boxes = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
    order, kept = np.argsort(-score), []
    while order.size:
        i, rest = order[0], order[1:]
        kept.append(i)
        overlap = box_iou(boxes[i : i + 1], boxes[rest])[0]
        order = rest[(overlap < iou) | (cls[rest] != cls[i])]
    return boxes[kept], score[kept], cls[kept]


def match(ref, got, thr: float = MATCH_IOU) -> int:
    """Greedy one-to-one matches between reference and predicted boxes (same class, IoU >= thr)."""
    rb, _, rc = ref
    gb, _, gc = got
    if len(rb) == 0 or len(gb) == 0:
        return 0
    iou = box_iou(rb, gb)
    iou[rc[:, None] != gc[None, :]] = 0
    hits = 0
    while iou.size and iou.max() >= thr:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        hits += 1
        iou[i, :] = 0
        iou[:, j] = 0
    return hits


def box_counts(outputs: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    tp = n_ref = n_got = 0
    for out, ref in zip(outputs, reference, strict=True):
        r, g = decode_yolov8(ref), decode_yolov8(out)
        tp += match(r, g)
        n_ref += len(r[0])
        n_got += len(g[0])
    return tp, n_ref, n_got


def box_f1(outputs: list, labels: np.ndarray) -> float:
    """optcli metric (module:callable): box F1 of the model's detections against the fp32 model's (the labels)."""
    tp, n_ref, n_got = box_counts(np.asarray(outputs[0]), np.asarray(labels)[: len(outputs[0])])
    return 2 * tp / max(n_ref + n_got, 1)
