"""The synthetic "shapes world" (docs/shapes-world.md): scene sampling, rendering and
the ground truth of every task (detection, grounding, VQA, captioning).

numpy + PIL only. Everything is a pure function of the numpy Generator passed in, so a
scene, its image and its task annotations are reproducible from a seed.

Coordinates are pixel-edge coordinates: pixel (x, y) covers [x, x+1) x [y, y+1), boxes
are xyxy floats in that frame. A scene stores only what the tasks need (shape, colour,
tight box, angle); how it is drawn (antialiasing, edges, background texture) is decided
by `render`, so another renderer that honours the box/angle contract is just as valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

MIN_SIDE, MAX_SIDE = 256, 640          # image width / height range (inclusive)
MAX_OBJECTS = 6
BOX_MIN_FRAC, BOX_MAX_FRAC = 0.08, 0.40  # box side relative to the shorter image side
MAX_IOU = 0.3
# Stricter than the spec, never looser: IoU alone lets a small box sit wholly inside a big
# one (IoU 0.15), i.e. an object that is mostly hidden. Cap intersection / smaller area too.
MAX_IOA = 0.5
COLOUR_JITTER = 25
# Relations / size words are only *generated* when they are clear by this much, so the
# training signal is never a coin flip; the ground truth itself stays "by box centres".
RELATION_MARGIN_FRAC = 0.04            # of the shorter image side
SIZE_RATIO_MARGIN = 1.15               # largest area >= 1.15 x runner-up

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


# --------------------------------------------------------------------------- scene types
@dataclass
class ShapeObject:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # xyxy, tight box of the drawn (rotated) polygon
    angle: float                             # degrees, counter-clockwise on screen; 0 for circles
    rgb: tuple[int, int, int]                # jittered fill colour

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass
class Background:
    kind: str                                   # "flat" | "gradient" | "noise"
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int] | None = None  # gradient end colour
    angle: float = 0.0                          # gradient direction, degrees
    amplitude: float = 0.0                      # noise texture: +- grey levels


@dataclass
class Scene:
    width: int
    height: int
    objects: list[ShapeObject]
    background: Background = field(default_factory=lambda: Background("flat", (200, 200, 200)))


@dataclass
class Phrase:
    """A grounding phrase: its text, the indices of the scene objects it denotes (empty
    for a negative phrase) and a kind tag: "colour" (colour + shape), "size" (small/large
    [+ colour] + shape), "relation" or "plural" (a shape in the plural: all of them)."""

    text: str
    objects: list[int]
    kind: str


# --------------------------------------------------------------------------- geometry
def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices [P, 2] of the unrotated shape, centred on 0, y pointing down."""
    if shape == "circle":
        t = np.arange(64) * (2 * np.pi / 64)  # includes 0/90/180/270 deg: exact tight box
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if shape == "triangle":  # equilateral, pointing up
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":      # five points; inner radius a bit fatter than a pentagram
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "hexagon":
        t = np.deg2rad(60 * np.arange(6))
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "cross":     # plus sign, arms a third of the span wide
        w = 1 / 3
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
                         [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]], float)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_UNIT = {s: _unit_polygon(s) for s in SHAPES}


def _rotated(shape: str, angle: float) -> np.ndarray:
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # y points down, so this turns counter-clockwise as seen on screen
    rot = np.array([[c, s], [-s, c]])
    return _UNIT[shape] @ rot


def shape_polygon(obj: ShapeObject) -> np.ndarray:
    """The drawn polygon [P, 2] (pixel-edge coordinates): the rotated unit shape stretched
    onto `obj.box`, so the polygon's tight box is exactly the object's box."""
    pts = _rotated(obj.shape, obj.angle)
    lo, hi = pts.min(0), pts.max(0)
    x0, y0, x1, y1 = obj.box
    scale = np.array([x1 - x0, y1 - y0]) / (hi - lo)
    return (pts - lo) * scale + np.array([x0, y0])


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _ioa(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


# --------------------------------------------------------------------------- sampling
def _chebyshev(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return max(abs(int(x) - int(y)) for x, y in zip(a, b))


def _is_background_colour(rgb: tuple[int, int, int]) -> bool:
    # well outside every object colour's jitter cube (25) so no background reads as one
    return all(_chebyshev(rgb, c) >= 60 for c in COLOURS.values())


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    while True:
        if rng.random() < 0.5:  # grey
            g = int(rng.integers(70, 236))
            rgb = (g, g, g)
        else:                   # pale tint: light base, small per-channel offsets
            base = int(rng.integers(200, 246))
            rgb = tuple(int(np.clip(base + rng.integers(-22, 11), 0, 255)) for _ in range(3))
        if _is_background_colour(rgb):
            return rgb  # type: ignore[return-value]


def _sample_background(rng: np.random.Generator) -> Background:
    kind = ("flat", "gradient", "noise")[int(rng.integers(3))]
    colour = _background_colour(rng)
    if kind == "gradient":
        return Background(kind, colour, _background_colour(rng), float(rng.uniform(0, 360)))
    if kind == "noise":
        return Background(kind, colour, amplitude=float(rng.uniform(4, 14)))
    return Background(kind, colour)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene following the spec: 256..640 px sides, 1-6 objects, box sides 8%-40%
    of the shorter side, pairwise box IoU <= 0.3, object colours jittered +-25."""
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    background = _sample_background(rng)
    short = min(width, height)
    lo, hi = BOX_MIN_FRAC * short, BOX_MAX_FRAC * short
    objects: list[ShapeObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        angle = 0.0 if shape == "circle" else float(rng.uniform(0, 360))
        pts = _rotated(shape, angle)
        ext = pts.max(0) - pts.min(0)
        # long side drawn so that the short side is still >= lo
        long_lo = lo * ext.max() / ext.min()
        for _try in range(30):  # rejection sampling against the IoU limit
            scale = rng.uniform(long_lo, hi) / ext.max()
            bw, bh = ext * scale
            x0 = rng.uniform(0, width - bw)
            y0 = rng.uniform(0, height - bh)
            box = (float(x0), float(y0), float(x0 + bw), float(y0 + bh))
            if all(box_iou(box, o.box) <= MAX_IOU and _ioa(box, o.box) <= MAX_IOA for o in objects):
                break
        else:
            continue  # crowded: drop this object rather than break the IoU rule
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        objects.append(ShapeObject(shape, colour, box, angle, rgb))  # type: ignore[arg-type]
    # drawn in list order: big ones first so small ones are never hidden behind them
    objects.sort(key=lambda o: -o.area)
    return Scene(width, height, objects, background)


# --------------------------------------------------------------------------- rendering
def _render_background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]; objects are composited patch by patch afterwards, so the full
    image is never held as floats (that alone cost more than all the shapes)."""
    bg, w, h = scene.background, scene.width, scene.height
    c1 = np.array(bg.colour, np.float32)
    if bg.kind == "gradient" and bg.colour2 is not None:
        a = math.radians(bg.angle)
        xs = np.arange(w, dtype=np.float32) * math.cos(a)
        ys = np.arange(h, dtype=np.float32) * math.sin(a)
        t = ys[:, None] + xs[None, :]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        # the gradient is one ramp per channel: interpolate through a 256-entry table
        ramp = c1 + np.linspace(0, 1, 256, dtype=np.float32)[:, None] * (np.array(bg.colour2) - c1)
        lut = np.clip(ramp + 0.5, 0, 255).astype(np.uint8)
        return lut[(t * 255 + 0.5).astype(np.uint8)]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg.colour
    if bg.kind == "noise":
        # smooth low-contrast texture: a coarse random grid upsampled bilinearly
        gw, gh = int(rng.integers(4, 33)), int(rng.integers(4, 33))
        coarse = rng.uniform(-bg.amplitude, bg.amplitude, (gh, gw)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BILINEAR))
        offset = np.rint(smooth).astype(np.int16)[..., None]
        img = np.clip(img.astype(np.int16) + offset, 0, 255).astype(np.uint8)
    return img


def _paint(img: np.ndarray, poly: np.ndarray, rgb: np.ndarray, edge_rgb: np.ndarray | None,
           edge_width: float, ss: int) -> None:
    """Composite one filled polygon into img (uint8 HxWx3) in place, drawn at `ss`x
    supersampling inside a local patch (cheap even for 4x on a 640 px image)."""
    h, w = img.shape[:2]
    x0 = max(int(math.floor(poly[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(poly[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(poly[:, 0].max())) + 1, w)
    y1 = min(int(math.ceil(poly[:, 1].max())) + 1, h)
    pw, ph = x1 - x0, y1 - y0
    # PIL truncates vertices to integers and fills pixels inclusively, so the pixel-edge
    # coordinate e maps to (e - origin) * ss unshifted: a (sub)pixel is painted iff the
    # polygon touches it, symmetric on all sides, error under one (sub)pixel.
    pts = [tuple(p) for p in ((poly - [x0, y0]) * ss).tolist()]
    mask = Image.new("L", (pw * ss, ph * ss), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    alpha = np.asarray(mask.reduce(ss) if ss > 1 else mask, np.float32) / 255
    region = img[y0:y1, x0:x1].astype(np.float32)
    if edge_rgb is None:
        region += alpha[..., None] * (rgb - region)
        img[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return
    inner = Image.new("L", mask.size, 0)
    # PIL draws a wide polygon outline inside the polygon: inner = fill minus the edge band
    ImageDraw.Draw(inner).polygon(pts, fill=255, outline=0, width=max(1, round(edge_width * ss)))
    core = np.asarray(inner.reduce(ss) if ss > 1 else inner, np.float32) / 255
    core = np.minimum(core, alpha)
    region *= (1 - alpha)[..., None]
    region += (alpha - core)[..., None] * edge_rgb + core[..., None] * rgb
    img[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, *, antialias: int | None = None,
           edges: bool | None = None) -> np.ndarray:
    """Draw the scene: uint8 [H, W, 3] RGB.

    `antialias` is the supersampling factor (1 = aliased, hard edges); None draws it at
    random (1 or 2..4), so models see both. `edges` forces the thin darker edge on/off
    for every object; None decides per object at random.
    """
    img = _render_background(scene, rng)
    ss = antialias if antialias is not None else (1 if rng.random() < 0.3 else int(rng.integers(2, 5)))
    for obj in scene.objects:
        rgb = np.array(obj.rgb, np.float32)
        has_edge = edges if edges is not None else bool(rng.random() < 0.3)
        edge_rgb = rgb * float(rng.uniform(0.45, 0.7)) if has_edge else None
        edge_width = float(rng.uniform(1.0, 2.5))
        _paint(img, shape_polygon(obj), rgb, edge_rgb, edge_width, ss)
    return img


# --------------------------------------------------------------------------- helpers
def _clear(d: float, scene: Scene) -> bool:
    return abs(d) >= RELATION_MARGIN_FRAC * min(scene.width, scene.height)


def _relation_offset(subject: ShapeObject, anchor: ShapeObject, rel: str) -> float:
    """Positive when `subject rel anchor` holds, by box centres (y grows downwards)."""
    (sx, sy), (ax, ay) = subject.centre, anchor.centre
    return {"left of": ax - sx, "right of": sx - ax, "above": ay - sy, "below": sy - ay}[rel]


def _combos(scene: Scene) -> dict[tuple[str, str], list[int]]:
    """(colour, shape) -> indices of the objects with it, in a deterministic order."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        out.setdefault((o.colour, o.shape), []).append(i)
    return dict(sorted(out.items()))


def _extreme(scene: Scene, idx: list[int], largest: bool) -> int | None:
    """The largest/smallest (by box area) of `idx`, or None when it is not clearly so."""
    if not idx:
        return None
    order = sorted(idx, key=lambda i: scene.objects[i].area, reverse=largest)
    if len(order) == 1:
        return order[0]
    a, b = scene.objects[order[0]].area, scene.objects[order[1]].area
    ratio = a / b if largest else b / a
    return order[0] if ratio >= SIZE_RATIO_MARGIN else None


def _pick(rng: np.random.Generator, items: list, k: int) -> list:
    k = max(0, min(k, len(items)))
    return [items[i] for i in rng.permutation(len(items))[:k]]


# --------------------------------------------------------------------------- tasks
def _shapes_present_absent(scene: Scene) -> tuple[list[str], list[str]]:
    """The shapes in the scene and those not in it, each in SHAPES order."""
    present = [s for s in SHAPES if any(o.shape == s for o in scene.objects)]
    return present, [s for s in SHAPES if s not in present]


def detection_phrases(scene: Scene, rng: np.random.Generator) -> list[str]:
    """A detection prompt's class list: every present shape plus a random number of
    absent ones (all six about a third of the time), in random order."""
    present, absent = _shapes_present_absent(scene)
    if rng.random() < 0.35:
        chosen = list(SHAPES)
    else:
        chosen = present + _pick(rng, absent, int(rng.integers(0, len(absent) + 1)))
    return _pick(rng, chosen, len(chosen))


def grounding_phrases(scene: Scene, rng: np.random.Generator) -> list[Phrase]:
    """Grounding phrases with the objects they denote, shuffled:
    every present colour+shape ("red circle", kind "colour"); for shapes seen >= 2 times,
    "small"/"large" [+ the object's colour] + shape (kind "size", only when the extreme
    is clear); up to two relations "the A rel the B" with B unique in the image (kind
    "relation"; the denoted set may be empty); about as many absent colour+shape combos
    as positives (negatives, kind "colour")."""
    objs = scene.objects
    combos = _combos(scene)
    pos = [Phrase(f"{c} {s}", idx, "colour") for (c, s), idx in combos.items()]
    for s in SHAPES:
        idx = [i for i, o in enumerate(objs) if o.shape == s]
        if len(idx) < 2:
            continue
        for word, largest in (("small", False), ("large", True)):
            j = _extreme(scene, idx, largest)
            if j is None:
                continue
            # "large blue star" only with the colour of the largest star itself: then
            # "largest star" and "largest blue star" agree, so the phrase is unambiguous
            text = f"{word} {objs[j].colour} {s}" if rng.random() < 0.5 else f"{word} {s}"
            pos.append(Phrase(text, [j], "size"))
    pos += relation_phrases(scene, rng, int(rng.integers(0, 3)))
    n_neg = len(pos) + int(rng.integers(-1, 2))
    neg = [Phrase(t, [], "colour") for t in _negative_combos(combos, rng, n_neg)]
    phrases = pos + neg
    return _pick(rng, phrases, len(phrases))


def plural_phrases(scene: Scene, rng: np.random.Generator) -> list[Phrase]:
    """Shapes named in the plural, as count questions name them ("how many circles are
    there?"): each present shape with probability 1/2, denoting every object of that shape,
    and one absent shape's plural, denoting none. Unshuffled."""
    present, absent = _shapes_present_absent(scene)
    out = [Phrase(PLURALS[s], [i for i, o in enumerate(scene.objects) if o.shape == s], "plural")
           for s in present if rng.random() < 0.5]
    return out + [Phrase(PLURALS[s], [], "plural") for s in _pick(rng, absent, 1)]


def _negative_combos(combos: dict[tuple[str, str], list[int]], rng: np.random.Generator, k: int) -> list[str]:
    """k absent colour+shape phrases, about two thirds of them hard: a present shape in
    another colour or a present colour on another shape. Random absent combos are mostly
    wrong in both words and teach little about the colour-shape binding that colour
    phrases need."""
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
    present_shapes = {s for _, s in combos}
    present_colours = {c for c, _ in combos}
    hard = [cs for cs in absent if cs[1] in present_shapes or cs[0] in present_colours]
    chosen = _pick(rng, hard, int(round(k * 2 / 3)))
    chosen += _pick(rng, [cs for cs in absent if cs not in chosen], k - len(chosen))
    return [f"{c} {s}" for c, s in chosen]


def relation_phrases(scene: Scene, rng: np.random.Generator, k: int) -> list[Phrase]:
    """Up to k relations "the A rel the B", B a unique colour+shape of the scene, A another
    present one whose every object is clearly on one side of B (kind "relation"; the denoted
    set, A's objects on the named side, may be empty)."""
    combos = _combos(scene)
    anchors = [key for key, idx in combos.items() if len(idx) == 1]
    out: list[Phrase] = []
    for _ in range(4 * k):
        if len(out) >= k or not anchors or len(combos) < 2:
            break
        anchor_key = anchors[int(rng.integers(len(anchors)))]
        subj_keys = [key for key in combos if key != anchor_key]
        subj_key = subj_keys[int(rng.integers(len(subj_keys)))]
        rel = RELATIONS[int(rng.integers(4))]
        anchor = scene.objects[combos[anchor_key][0]]
        offs = [_relation_offset(scene.objects[i], anchor, rel) for i in combos[subj_key]]
        if not all(_clear(d, scene) for d in offs):
            continue  # a subject sits too close to the anchor's centre line
        text = f"the {subj_key[0]} {subj_key[1]} {rel} the {anchor_key[0]} {anchor_key[1]}"
        if any(p.text == text for p in out):
            continue
        denoted = [i for i, d in zip(combos[subj_key], offs) if d > 0]
        out.append(Phrase(text, denoted, "relation"))
    return out


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question/answer pairs of the five spec kinds, each where it is well defined:
    colour of a unique shape; count of a shape (present and absent, digits); "is there a
    <colour> <shape>?" (one yes, one no); shape in a relation to a unique object (only
    when one shape answers it clearly); colour of the largest (or smallest) object."""
    objs = scene.objects
    combos = _combos(scene)
    qa: list[tuple[str, str]] = []
    unique = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
    for s in _pick(rng, unique, 1):
        qa.append((f"what color is the {s}?", next(o.colour for o in objs if o.shape == s)))
    present, absent = _shapes_present_absent(scene)
    for s in _pick(rng, present, 1) + _pick(rng, absent, int(rng.random() < 0.5)):
        qa.append((f"how many {PLURALS[s]} are there?", str(sum(o.shape == s for o in objs))))
    for c, s in _pick(rng, list(combos), 1):
        qa.append((f"is there {article(c)} {c} {s}?", "yes"))
    missing = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
    for c, s in _pick(rng, missing, 1):
        qa.append((f"is there {article(c)} {c} {s}?", "no"))
    rel_q = _relation_question(scene, rng)
    if rel_q:
        qa.append(rel_q)
    largest = rng.random() < 0.7
    j = _extreme(scene, list(range(len(objs))), largest)
    if j is not None:
        qa.append((f"what color is the {'largest' if largest else 'smallest'} object?", objs[j].colour))
    return qa


_RELATION_EXTREMES = {"left of": "leftmost", "right of": "rightmost", "above": "topmost", "below": "bottommost"}


def question_extreme(question: str) -> str | None:
    """The object that answers a question of `vqa_pairs`, when one extreme always does:
    "what shape is left of the red circle?" -> "leftmost" (asked only when every object on
    that side has one shape, and the leftmost object is on that side), "what color is the
    largest object?" -> "largest"; None for the other kinds."""
    if question.startswith("what shape is "):
        return _RELATION_EXTREMES.get(question.removeprefix("what shape is ").split(" the ")[0])
    for which in ("largest", "smallest"):
        if question == f"what color is the {which} object?":
            return which
    return None


def _relation_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    combos = _combos(scene)
    anchors = [key for key, idx in combos.items() if len(idx) == 1]
    for key in _pick(rng, anchors, len(anchors)):
        a = combos[key][0]
        for rel in _pick(rng, list(RELATIONS), 4):
            offs = {i: _relation_offset(o, scene.objects[a], rel)
                    for i, o in enumerate(scene.objects) if i != a}
            if not all(_clear(d, scene) for d in offs.values()):
                continue
            shapes = {scene.objects[i].shape for i, d in offs.items() if d > 0}
            if len(shapes) == 1:
                return f"what shape is {rel} the {key[0]} {key[1]}?", shapes.pop()
    return None


_REL_WORDS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
              "above": ("above",), "below": ("below", "under")}
_PREFIXES = ("", "", "there is ", "an image of ", "a picture of ")


def article(word: str) -> str:
    """ "an" before a vowel sound ("an orange star"), else "a"."""
    return "an" if word[:1] in "aeiou" else "a"


def _noun_group(colour: str, shape: str, n: int) -> str:
    return f"{article(colour)} {colour} {shape}" if n == 1 else f"{_NUMBER_WORDS[n]} {colour} {PLURALS[shape]}"


def _join_list(items: list[str], rng: np.random.Generator) -> str:
    if len(items) <= 1:
        return "".join(items)
    sep = ", " if rng.random() < 0.5 else " and "
    return sep.join(items[:-1]) + " and " + items[-1]


def _one_caption(scene: Scene, rng: np.random.Generator) -> str:
    objs = scene.objects
    if not objs:
        return "an empty picture"
    pairs = [(i, j, rel) for i in range(len(objs)) for j in range(len(objs)) if i != j
             for rel in RELATIONS
             if _relation_offset(objs[i], objs[j], rel) > 0
             and _clear(_relation_offset(objs[i], objs[j], rel), scene)]
    rest = list(range(len(objs)))
    head = ""
    if pairs:
        i, j, rel = pairs[int(rng.integers(len(pairs)))]
        oi, oj = objs[i], objs[j]
        other = "another" if (oi.colour, oi.shape) == (oj.colour, oj.shape) else article(oj.colour)
        words = _REL_WORDS[rel]
        head = (f"{article(oi.colour)} {oi.colour} {oi.shape} {words[int(rng.integers(len(words)))]} "
                f"{other} {oj.colour} {oj.shape}")
        rest = [k for k in rest if k not in (i, j)]
    groups: dict[tuple[str, str], int] = {}
    for k in _pick(rng, rest, len(rest)):
        key = (objs[k].colour, objs[k].shape)
        groups[key] = groups.get(key, 0) + 1
    tail = [_noun_group(c, s, n) for (c, s), n in groups.items()]
    if head and tail:
        joiner = (" and ", " and ", ", with ")[int(rng.integers(3))]
        text = head + joiner + _join_list(tail, rng)
    else:
        text = head or _join_list(tail, rng)
    return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + text


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """n reference captions: every object with its colour, and a relation between two of
    them (by box centres, only a clear one) when there are two or more; varied wording.
    Distinct where the scene allows it (a one-object scene has few wordings)."""
    out: list[str] = []
    for _ in range(10 * n):
        if len(out) == n:
            break
        c = _one_caption(scene, rng)
        if c not in out:
            out.append(c)
    while len(out) < n:  # few wordings exist: repeat rather than return fewer
        out.append(out[len(out) % len(out)])
    return out
