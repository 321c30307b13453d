"""Procedural images and captions for the demo CLIP that ships in ``taskres/assets``, and its downstream tasks.

A scene is one coloured shape on a backdrop. Pretraining pairs compose its attributes (shape, colour, size,
position, background) into varied captions; some shapes (``HELD_OUT_SHAPES``) and some renderings (stripes,
heavy noise, clutter, outlines) never occur in pretraining, so the downstream tasks built from them need what
zero-shot cannot have. Everything is a pure function of explicit seeds: no global random state is read or set.

Shapes are drawn as a mask at ``SUPERSAMPLE`` times the output size and box-filtered down (anti-aliasing), then
composited over the backdrop in numpy.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

PRETRAIN_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
# Never drawn and never named in pretraining: "new knowledge" for the downstream task new_shapes.
HELD_OUT_SHAPES = ("diamond", "crescent", "arrow", "hexagon", "hourglass")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 30),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "pink": (245, 125, 190),
    "brown": (125, 80, 40),
}
BACKGROUNDS = {"white": (238, 238, 238), "black": (22, 22, 22), "gray": (128, 128, 128)}
# Shape radius as a fraction of the image side.
SIZES = {"small": (0.15, 0.21), "medium": (0.22, 0.29), "large": (0.30, 0.38)}
POSITIONS = ("center", "left", "right", "top", "bottom")
STYLES = ("filled", "outline")
BACKDROPS = ("plain", "stripes", "clutter")


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image; ``seed`` drives the pixel-level randomness (noise, stripes, clutter)."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    rgb: tuple[int, int, int]  # the colour actually drawn (jittered)
    bg_rgb: tuple[int, int, int]
    cx: float  # centre and radius as fractions of the image side
    cy: float
    radius: float
    angle: float  # degrees
    seed: int
    style: str = "filled"
    backdrop: str = "plain"
    noise: float = 3.0  # std of additive pixel noise, 0..255 scale
    contrast: float = 1.0
    pattern: float = 1.0  # strength of a striped backdrop: 0 plain, 1 full-contrast stripes


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return cast(
        "tuple[int, int, int]",
        tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)),
    )


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colour: str | None = None,
    shapes: Sequence[str] = PRETRAIN_SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    style: str = "filled",
    backdrop: str = "plain",
    noise: tuple[float, float] = (0.0, 6.0),
    contrast: tuple[float, float] = (1.0, 1.0),
    pattern: tuple[float, float] = (1.0, 1.0),
) -> Scene:
    """Draw a scene from the pretraining distribution, or a shifted one.

    ``shape``/``colour`` fix those attributes; ``style`` and ``backdrop`` pick the rendering; ``noise``
    (pixel std, 0..255), ``contrast`` (1 = unchanged) and ``pattern`` (stripe strength) are uniform ranges.
    """
    shape = shape if shape is not None else shapes[int(rng.integers(len(shapes)))]
    colour = colour if colour is not None else colours[int(rng.integers(len(colours)))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZES[size]))
    # Large shapes have no room to sit off-centre.
    position = "center" if size == "large" else POSITIONS[rng.integers(len(POSITIONS))]
    off = float(rng.uniform(max(0.12, 0.5 - radius - 0.12), max(0.12, 0.5 - radius - 0.02)))
    along = float(rng.uniform(-0.05, 0.05))
    cx, cy = {
        "center": (0.5 + float(rng.uniform(-0.05, 0.05)), 0.5 + along),
        "left": (0.5 - off, 0.5 + along),
        "right": (0.5 + off, 0.5 + along),
        "top": (0.5 + along, 0.5 - off),
        "bottom": (0.5 + along, 0.5 + off),
    }[position]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        background=background,
        rgb=_jitter(COLOURS[colour], rng, 18),
        bg_rgb=_jitter(BACKGROUNDS[background], rng, 12),
        cx=cx,
        cy=cy,
        radius=radius,
        angle=float(rng.uniform(-12.0, 12.0)),
        seed=int(rng.integers(2**31)),
        style=style,
        backdrop=backdrop,
        noise=float(rng.uniform(*noise)),
        contrast=float(rng.uniform(*contrast)),
        pattern=float(rng.uniform(*pattern)),
    )


# ---------------------------------------------------------------- geometry (unit radius, y pointing down)


def _regular(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(math.radians(start_deg + 360.0 * k / n)),
            radius * math.sin(math.radians(start_deg + 360.0 * k / n)),
        )
        for k in range(n)
    ]


def _star() -> list[tuple[float, float]]:
    return [
        (
            (1.1 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
            (1.1 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)) + 0.08,
        )
        for k in range(10)
    ]


def _heart() -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    xs = 16 * np.sin(ts) ** 3 / 16.5
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 16.5 + 0.1
    return list(zip(xs.tolist(), ys.tolist()))


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(x, y + 0.15) for x, y in _regular(3, 1.12, -90)],
    "star": _star(),
    "cross": [
        (-0.3, -1.0),
        (0.3, -1.0),
        (0.3, -0.3),
        (1.0, -0.3),
        (1.0, 0.3),
        (0.3, 0.3),
        (0.3, 1.0),
        (-0.3, 1.0),
        (-0.3, 0.3),
        (-1.0, 0.3),
        (-1.0, -0.3),
        (-0.3, -0.3),
    ],
    "heart": _heart(),
    "diamond": [(0.0, -1.12), (0.66, 0.0), (0.0, 1.12), (-0.66, 0.0)],
    "arrow": [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.7), (1.05, 0.0), (0.15, 0.7), (0.15, 0.22), (-1.0, 0.22)],
    "hexagon": _regular(6, 1.0, 0),
    "hourglass": [(-0.72, -1.0), (0.72, -1.0), (0.12, 0.0), (0.72, 1.0), (-0.72, 1.0), (-0.12, 0.0)],
}
_DISCS: dict[str, list[tuple[float, float, float, int]]] = {  # (x, y, r, fill) drawn in order
    "circle": [(0.0, 0.0, 1.0, 255)],
    "crescent": [(0.0, 0.0, 1.0, 255), (0.5, -0.18, 0.86, 0)],
}


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Min over a (2 * width + 1)^2 square, as two separable 1-D passes; outside the image counts as empty."""
    k = 2 * width + 1
    padded = np.pad(mask, width)
    rows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=0).min(axis=-1)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).min(axis=-1)


def _shape_mask(scene: Scene, size: int) -> Image.Image:
    """The scene's shape as an 8-bit mask at ``size * SUPERSAMPLE`` pixels."""
    hi = size * SUPERSAMPLE
    mask = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(math.radians(scene.angle)), math.sin(math.radians(scene.angle))
    r = scene.radius * hi

    def place(x: float, y: float) -> tuple[float, float]:
        return (scene.cx * hi + r * (c * x - s * y), scene.cy * hi + r * (s * x + c * y))

    if scene.shape in _POLYGONS:
        draw.polygon([place(x, y) for x, y in _POLYGONS[scene.shape]], fill=255)
    elif scene.shape in _DISCS:
        for x, y, rr, fill in _DISCS[scene.shape]:
            px, py = place(x, y)
            draw.ellipse([px - rr * r, py - rr * r, px + rr * r, py + rr * r], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {sorted(_POLYGONS) + sorted(_DISCS)}")
    if scene.style == "outline":
        # Keep a band about 1.5 output pixels wide along the boundary.
        width = int(round(1.5 * SUPERSAMPLE))
        full = np.asarray(mask)
        mask = Image.fromarray(full - np.minimum(full, _erode(full, width)))
    elif scene.style != "filled":
        raise ValueError(f"unknown style {scene.style!r}; known: {STYLES}")
    return mask


def _backdrop(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 backdrop, 0..255."""
    bg = np.broadcast_to(np.asarray(scene.bg_rgb, dtype=np.float32), (size, size, 3)).copy()
    if scene.backdrop == "plain":
        return bg
    if scene.backdrop == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3.5, 7.0)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        u = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi)
        w = (0.5 + 0.5 * np.tanh(3.0 * np.sin(u)))[..., None]
        others = [n for n in COLOURS if n != scene.colour]
        c1 = np.asarray(_jitter(COLOURS[others[rng.integers(len(others))]], rng, 25), dtype=np.float32)
        c2 = np.asarray(BACKGROUNDS[("white", "black")[rng.integers(2)]], dtype=np.float32)
        return (1 - scene.pattern) * bg + scene.pattern * (w * c1 + (1 - w) * c2)
    if scene.backdrop == "clutter":
        hi = size * SUPERSAMPLE
        canvas = Image.fromarray(bg.astype(np.uint8)).resize((hi, hi), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(canvas)
        names = list(COLOURS) + list(BACKGROUNDS)
        for _ in range(int(rng.integers(7, 12))):
            col = _jitter((COLOURS | BACKGROUNDS)[names[rng.integers(len(names))]], rng, 20)
            x0, y0 = rng.uniform(0, hi, 2)
            if rng.random() < 0.55:
                length, ang = rng.uniform(0.2, 0.6) * hi, rng.uniform(0, 2 * math.pi)
                draw.line(
                    [(x0, y0), (x0 + length * math.cos(ang), y0 + length * math.sin(ang))],
                    fill=col,
                    width=int(rng.integers(3, 7)),
                )
            else:
                rr = rng.uniform(1.0, 2.8) * SUPERSAMPLE
                draw.ellipse([x0 - rr, y0 - rr, x0 + rr, y0 + rr], fill=col)
        return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    raise ValueError(f"unknown backdrop {scene.backdrop!r}; known: {BACKDROPS}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image; a pure function of the scene."""
    rng = np.random.default_rng(scene.seed)
    mask = _shape_mask(scene, size).resize((size, size), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    img = _backdrop(scene, size, rng) * (1 - alpha) + np.asarray(scene.rgb, dtype=np.float32) * alpha
    if scene.contrast != 1.0:
        img = img.mean() + (img - img.mean()) * scene.contrast
    if scene.noise > 0:
        img = img + rng.normal(0.0, scene.noise, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- captions

_PREFIXES = (
    "a photo of {a}",
    "{a}",
    "an image of {a}",
    "a picture of {a}",
    "a drawing of {a}",
    "a rendering of {a}",
    "there is {a}",
    "a photo of the",
    "itap of {a}",
    "a good photo of the",
    "a bad photo of {a}",
)
_POSITION_PHRASES = {
    "center": ("in the middle", "in the center"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
_BACKGROUND_PHRASES = ("on a {} background", "on {}", "against a {} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption for a pretraining scene, composing a random subset of its attributes with varied phrasing."""
    if rng.random() < 0.1:
        form = rng.integers(3)
        if form == 0:
            return f"the {scene.shape} is {scene.colour}."
        if form == 1:
            return f"a {scene.shape} that is {scene.colour}."
        return f"a {scene.shape} in {scene.colour}."
    with_shape = rng.random() < 0.9
    with_colour = rng.random() < 0.65 or not with_shape
    words = []
    if scene.size != "medium" and rng.random() < 0.35:
        words.append(scene.size if rng.random() < 0.7 else {"small": "tiny", "large": "big"}[scene.size])
    if with_colour:
        words.append(scene.colour)
    words.append(scene.shape if with_shape else ("shape" if rng.random() < 0.7 else "object"))
    noun_phrase = " ".join(words)
    extras = []
    if rng.random() < 0.35:
        options = _POSITION_PHRASES[scene.position]
        extras.append(options[rng.integers(len(options))])
    if rng.random() < 0.25:
        # Short form next to a position phrase: captions must fit a 16-token context.
        phrase = _BACKGROUND_PHRASES[rng.integers(len(_BACKGROUND_PHRASES))] if not extras else "on {}"
        extras.insert(int(rng.integers(len(extras) + 1)), phrase.format(scene.background))
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))].format(a=_article(noun_phrase))
    return " ".join([prefix, noun_phrase, *extras]) + "."


def pretraining_pairs(
    n: int, seed: int, *, captions_per_image: int = 4, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[list[str]], list[Scene]]:
    """``n`` pretraining images ``(n, size, size, 3)`` uint8, ``captions_per_image`` captions each, and the scenes.

    Only ``PRETRAIN_SHAPES``, filled, on plain backdrops with mild noise.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = sample_scene(rng)
        images[i] = np.asarray(render(scene, size))
        captions.append([caption(scene, rng) for _ in range(captions_per_image)])
        scenes.append(scene)
    return images, captions, scenes


# ---------------------------------------------------------------- downstream tasks


@dataclass(frozen=True)
class TaskSpec:
    """One downstream classification task: class names, one prompt template, and a scene sampler per label."""

    name: str
    role: str  # "near" (close to pretraining), "shift" (same concepts, new rendering) or "new" (unseen concepts)
    description: str
    classnames: tuple[str, ...]
    template: str
    make_scene: Callable[[np.random.Generator, int], Scene] = field(repr=False)


_NEAR_COLOURS = ("red", "green", "blue")
_NEAR_SHAPES = ("circle", "square", "triangle", "star")
_NEAR_CLASSES = tuple(f"{c} {s}" for c in _NEAR_COLOURS for s in _NEAR_SHAPES)


def _shapes_task(name: str, role: str, description: str, shapes: Sequence[str], **shift) -> TaskSpec:
    return TaskSpec(
        name,
        role,
        description,
        tuple(shapes),
        "a photo of a {}.",
        lambda rng, label: sample_scene(rng, shape=shapes[label], **shift),
    )


DEMO_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "color_shapes",
        "near",
        "12 colour-shape pairs ('red circle') drawn as in pretraining: zero-shot should be strong.",
        _NEAR_CLASSES,
        "a photo of a {}.",
        lambda rng, label: sample_scene(
            rng, colour=_NEAR_CLASSES[label].split()[0], shape=_NEAR_CLASSES[label].split()[1]
        ),
    ),
    _shapes_task(
        "outline_shapes",
        "shift",
        "the 6 pretraining shapes drawn as outlines only (a rendering style never seen in pretraining).",
        PRETRAIN_SHAPES,
        style="outline",
    ),
    _shapes_task(
        "cluttered_shapes",
        "shift",
        "the 6 pretraining shapes among random lines and dots.",
        PRETRAIN_SHAPES,
        backdrop="clutter",
    ),
    _shapes_task(
        "noisy_shapes",
        "shift",
        "the 6 pretraining shapes at lower contrast under strong pixel noise.",
        PRETRAIN_SHAPES,
        noise=(15.0, 25.0),
        contrast=(0.8, 0.9),
    ),
    _shapes_task(
        "striped_shapes",
        "shift",
        "the 6 pretraining shapes on striped backgrounds.",
        PRETRAIN_SHAPES,
        backdrop="stripes",
        pattern=(0.35, 0.5),
    ),
    _shapes_task(
        "new_shapes",
        "new",
        "5 shapes never drawn nor named in pretraining: the text encoder has never "
        "seen their names, so zero-shot is near chance.",
        HELD_OUT_SHAPES,
    ),
)


def _task_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def write_demo_tasks(
    root: Path,
    seed: int = 0,
    *,
    train_per_class: int = 20,
    val_per_class: int = 4,
    test_per_class: int = 40,
    size: int = IMAGE_SIZE,
    tasks: Sequence[str] | None = None,
) -> list[dict]:
    """Write the demo tasks under ``root`` in CoOp's layout and describe them.

    For each task: ``root/<task>/images/<class_dir>/<split>_<i>.png`` and ``root/<task>/split_zhou_<task>.json``
    (``{"train"|"val"|"test": [[path relative to images/, label, classname], ...]}``). Returns one dict per task:
    ``name, role, description, image_dir, split_file, templates, classnames, num_classes, counts``.
    """
    known = {t.name: t for t in DEMO_TASKS}
    names = list(known) if tasks is None else list(tasks)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown demo task {n!r}; known: {sorted(known)}")
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    root = Path(root)
    out = []
    for name in names:
        spec = known[name]
        rng = _task_rng(seed, name)
        task_dir, image_dir = root / name, root / name / "images"
        split: dict[str, list] = {k: [] for k in counts}
        for label, classname in enumerate(spec.classnames):
            class_dir = classname.replace(" ", "_")
            (image_dir / class_dir).mkdir(parents=True, exist_ok=True)
            for part, count in counts.items():
                for i in range(count):
                    rel = f"{class_dir}/{part}_{i:03d}.png"
                    render(spec.make_scene(rng, label), size).save(image_dir / rel, compress_level=1)
                    split[part].append([rel, label, classname])
        split_file = task_dir / f"split_zhou_{name}.json"
        split_file.write_text(json.dumps(split))
        out.append(
            {
                "name": name,
                "role": spec.role,
                "description": spec.description,
                "image_dir": image_dir,
                "split_file": split_file,
                "templates": [spec.template],
                "classnames": list(spec.classnames),
                "num_classes": len(spec.classnames),
                "counts": {k: len(v) for k, v in split.items()},
            }
        )
    return out
