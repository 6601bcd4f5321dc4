"""Facts about easy-VQA images, and the sentences the demo tasks build from them.

Every easy-VQA image is a 64x64 RGB picture of one shape (circle, rectangle or triangle) in one of
eight colours on a light, slightly tinted background. An :class:`ImageFacts` holds

* ``shape`` and ``color``, read from the image's own easy-VQA questions and answers
  (:func:`facts_from_questions`; the pixels are only a fallback, see there), and
* ``hpos`` / ``vpos`` / ``size``, measured on the pixels (:func:`measure_pixels`).

The sentence builders (:func:`captions_for`, :data:`STATEMENT_FAMILIES`) are shared by the demo
data builder (:mod:`vlpet.demo.build_data`) and the text pretraining corpus
(:mod:`vlpet.demo.corpus`), so both speak exactly the same language.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
HPOS: tuple[str, ...] = ("left", "center", "right")
VPOS: tuple[str, ...] = ("top", "middle", "bottom")
SIZES: tuple[str, ...] = ("small", "large")

#: the RGB value easy-VQA paints each colour with (read off the images; anti-aliased edges aside,
#: every shape pixel has exactly this value)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}

#: a pixel belongs to the shape when its L1 distance (sum over R, G, B) to the background colour
#: exceeds this; over all 5,000 images a shape's palette colour is >= 235 away from its background
MASK_L1_THRESHOLD = 96
#: bounding-box side (pixels, the larger of width and height) from which a shape is "large";
#: over all 5,000 images the sides range over 8..33 px with a median of 23 px (51% large)
LARGE_MIN_SIDE = 23
#: fill ratio (shape pixels / bounding-box area) thresholds of the pixel shape classifier:
#: on the 4,533 images whose shape the questions decide, triangles fill 0.51-0.70, circles
#: 0.76-0.90 and (axis-aligned) rectangles 0.97-1.0; the thresholds sit in the gaps
TRIANGLE_MAX_FILL = 0.735
CIRCLE_MAX_FILL = 0.935


@dataclass(frozen=True)
class ImageFacts:
    shape: str
    color: str
    hpos: str  # left / center / right  (bounding-box centre in the left / middle / right third)
    vpos: str  # top / middle / bottom
    size: str  # small / large
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    shape_source: str = "questions"  # questions | negations | pixels
    color_source: str = "questions"

    def to_json(self) -> dict:
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        return d


# ------------------------------------------------------------------------------------------------
# facts from questions
# ------------------------------------------------------------------------------------------------
def question_template(question: str) -> str:
    """The question with its colour and shape words blanked ("is there a <color> shape ?"): the part of
    a question a model that never looks at the image can read."""
    words = question.strip().lower().replace("?", " ?").split()
    return " ".join("<color>" if w in COLORS else "<shape>" if w in SHAPES else w for w in words)


def question_polarity(question: str) -> bool:
    """True for an affirmative yes/no template ("is there a red shape?"), False for a negated one
    ("is there not a red shape?", "does the image not contain ...", "is no red shape present?")."""
    q = " " + question.strip().lower() + " "
    return not (" not " in q or q.startswith(" is no "))


def facts_from_questions(questions: Iterable[tuple[str, str]]) -> dict[str, dict[str, set[str]]]:
    """Shape and colour knowledge of one image from its (question, answer) pairs.

    Rules: (1) an answer that is a shape or a colour name is a fact; (2) a yes/no question that
    names a shape or colour states it is present when ``(answer == "yes") == affirmative``
    (see :func:`question_polarity`) and absent otherwise. Returns
    ``{"shape": {"pos": set, "neg": set}, "color": {...}}``.
    """
    out = {"shape": {"pos": set(), "neg": set()}, "color": {"pos": set(), "neg": set()}}
    for q, a in questions:
        a = a.strip().lower()
        if a in SHAPES:
            out["shape"]["pos"].add(a)
            continue
        if a in COLORS:
            out["color"]["pos"].add(a)
            continue
        if a not in ("yes", "no"):
            continue
        present = (a == "yes") == question_polarity(q)
        words = set(q.lower().replace("?", " ").split())
        for kind, vocab in (("shape", SHAPES), ("color", COLORS)):
            for w in vocab:
                if w in words:
                    out[kind]["pos" if present else "neg"].add(w)
    return out


def resolve_fact(kind: str, known: dict[str, set[str]], vocab: Sequence[str], pixel_guess: str) -> tuple[str, str]:
    """(value, source): a single positive fact ("questions"); else the one value not negated
    ("negations"); else the pixel estimate ("pixels"). Contradictions raise ``ValueError``."""
    pos, neg = known["pos"], known["neg"]
    if len(pos) > 1 or (pos & neg):
        raise ValueError(f"contradictory {kind} facts: present {sorted(pos)}, absent {sorted(neg)}")
    if pos:
        return next(iter(pos)), "questions"
    left = [v for v in vocab if v not in neg]
    if len(left) == 1:
        return left[0], "negations"
    if pixel_guess not in left:
        raise ValueError(f"pixel {kind} {pixel_guess!r} contradicts the questions (absent {sorted(neg)})")
    return pixel_guess, "pixels"


# ------------------------------------------------------------------------------------------------
# facts from pixels
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelFacts:
    shape: str
    color: str
    hpos: str
    vpos: str
    size: str
    bbox: tuple[int, int, int, int]
    fill: float


def _third(center: float, extent: int, names: Sequence[str]) -> str:
    if center < extent / 3:
        return names[0]
    if center > 2 * extent / 3:
        return names[2]
    return names[1]


def measure_pixels(rgb: np.ndarray) -> PixelFacts:
    """Position, size, and pixel estimates of shape and colour for one easy-VQA image.

    * background = the most frequent colour among the border pixels;
    * shape mask = pixels whose L1 distance to it exceeds :data:`MASK_L1_THRESHOLD`;
    * bbox = the mask's bounding box; its centre's third of the image (split at 1/3 and 2/3 of the
      width/height) gives ``hpos`` (left/center/right) and ``vpos`` (top/middle/bottom);
    * size = "large" if max(bbox width, height) >= :data:`LARGE_MIN_SIDE` else "small";
    * colour = the palette colour nearest (L1) to the median mask pixel;
    * shape = by fill ratio (triangle < 0.735 <= circle < 0.935 <= rectangle).
    """
    im = np.asarray(rgb)
    if im.ndim != 3 or im.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {im.shape}")
    im = im[:, :, :3].astype(np.int32)
    h, w = im.shape[:2]
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
    cols, counts = np.unique(border, axis=0, return_counts=True)
    bg = cols[int(np.argmax(counts))]
    mask = np.abs(im - bg).sum(-1) > MASK_L1_THRESHOLD
    if not mask.any():
        raise ValueError("no shape found (every pixel is close to the background colour)")
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    fill = float(mask.sum()) / float(bw * bh)
    med = np.median(im[mask], axis=0)
    color = min(PALETTE, key=lambda c: float(np.abs(med - np.array(PALETTE[c])).sum()))
    shape = "triangle" if fill < TRIANGLE_MAX_FILL else ("circle" if fill < CIRCLE_MAX_FILL else "rectangle")
    return PixelFacts(
        shape=shape,
        color=color,
        hpos=_third((x0 + x1) / 2 + 0.5, w, HPOS),
        vpos=_third((y0 + y1) / 2 + 0.5, h, VPOS),
        size="large" if max(bw, bh) >= LARGE_MIN_SIDE else "small",
        bbox=(x0, y0, x1, y1),
        fill=round(fill, 4),
    )


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_facts(path: str, questions: Iterable[tuple[str, str]]) -> tuple[ImageFacts, PixelFacts]:
    """Facts of one image: shape/colour from its questions (pixels as the last resort), position
    and size from its pixels. Also returns the raw pixel estimates (for agreement statistics)."""
    px = measure_pixels(load_rgb(path))
    known = facts_from_questions(questions)
    shape, s_src = resolve_fact("shape", known["shape"], SHAPES, px.shape)
    color, c_src = resolve_fact("color", known["color"], COLORS, px.color)
    facts = ImageFacts(shape, color, px.hpos, px.vpos, px.size, px.bbox, s_src, c_src)
    return facts, px


# ------------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------------
def position_phrase(hpos: str, vpos: str) -> str:
    """"in the center", "at the top", "on the left", "in the bottom right corner", ..."""
    if hpos == "center" and vpos == "middle":
        return "in the center"
    if hpos == "center":
        return f"at the {vpos}"
    if vpos == "middle":
        return f"on the {hpos}"
    return f"in the {vpos} {hpos} corner"


#: reference caption templates; every one names the colour and the shape, four name the position
#: and three the size
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {pos}",
    "a {color} {shape} {pos}",
    "there is a {size} {color} {shape} {pos}",
    "a {size} {shape} colored {color}",
    "the image shows a {color} {shape} {pos}",
)


def captions_for(shape: str, color: str, hpos: str, vpos: str, size: str) -> list[str]:
    pos = position_phrase(hpos, vpos)
    return [t.format(size=size, color=color, shape=shape, pos=pos) for t in CAPTION_TEMPLATES]


def all_fact_combinations() -> Iterable[dict[str, str]]:
    for shape, color, hpos, vpos, size in itertools.product(SHAPES, COLORS, HPOS, VPOS, SIZES):
        yield dict(shape=shape, color=color, hpos=hpos, vpos=vpos, size=size)


# ------------------------------------------------------------------------------------------------
# two-image statements (NLVR2-like)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatementFamily:
    """``text`` with ``{x}`` for the parameter (if any); ``truth(left, right, x)`` -> bool."""

    name: str
    text: str
    params: tuple[str, ...]
    truth: Callable[[ImageFacts, ImageFacts, str], bool]

    def render(self, param: str) -> str:
        return self.text.format(x=param)


_SIDE_WORD = {"left": "hpos", "right": "hpos", "top": "vpos", "bottom": "vpos"}
_POS_TEXT = {"left": "on the left side", "right": "on the right side", "top": "near the top", "bottom": "near the bottom"}


def _pos_ok(f: ImageFacts, p: str) -> bool:
    return getattr(f, _SIDE_WORD[p]) == p


STATEMENT_FAMILIES: tuple[StatementFamily, ...] = (
    StatementFamily("both_shape", "both images contain a {x}", SHAPES, lambda l, r, x: l.shape == x and r.shape == x),
    StatementFamily("both_color", "both images have a {x} shape", COLORS, lambda l, r, x: l.color == x and r.color == x),
    StatementFamily("left_shape", "the left image contains a {x}", SHAPES, lambda l, r, x: l.shape == x),
    StatementFamily("right_shape", "the right image contains a {x}", SHAPES, lambda l, r, x: r.shape == x),
    StatementFamily("left_color", "the left image has a {x} shape", COLORS, lambda l, r, x: l.color == x),
    StatementFamily("right_color", "the right image has a {x} shape", COLORS, lambda l, r, x: r.color == x),
    StatementFamily(
        "left_object", "the left image shows a {x}",
        tuple(f"{c} {s}" for c in COLORS for s in SHAPES),
        lambda l, r, x: f"{l.color} {l.shape}" == x,
    ),
    StatementFamily(
        "right_object", "the right image shows a {x}",
        tuple(f"{c} {s}" for c in COLORS for s in SHAPES),
        lambda l, r, x: f"{r.color} {r.shape}" == x,
    ),
    StatementFamily("same_color", "the two shapes have the same color", ("",), lambda l, r, x: l.color == r.color),
    StatementFamily("diff_color", "the two shapes have different colors", ("",), lambda l, r, x: l.color != r.color),
    StatementFamily("same_shape", "both images show the same kind of shape", ("",), lambda l, r, x: l.shape == r.shape),
    StatementFamily("diff_shape", "the two images show different shapes", ("",), lambda l, r, x: l.shape != r.shape),
    StatementFamily("any_shape", "at least one image contains a {x}", SHAPES, lambda l, r, x: x in (l.shape, r.shape)),
    StatementFamily("one_shape", "exactly one image contains a {x}", SHAPES, lambda l, r, x: (l.shape == x) != (r.shape == x)),
    StatementFamily("none_shape", "neither image contains a {x}", SHAPES, lambda l, r, x: x not in (l.shape, r.shape)),
    StatementFamily("any_color", "at least one image has a {x} shape", COLORS, lambda l, r, x: x in (l.color, r.color)),
    StatementFamily("none_color", "neither image has a {x} shape", COLORS, lambda l, r, x: x not in (l.color, r.color)),
    StatementFamily("both_size", "both shapes are {x}", SIZES, lambda l, r, x: l.size == x and r.size == x),
    StatementFamily("left_size", "the shape in the left image is {x}", SIZES, lambda l, r, x: l.size == x),
    StatementFamily("right_size", "the shape in the right image is {x}", SIZES, lambda l, r, x: r.size == x),
    StatementFamily(
        "left_pos", "the shape in the left image is {x}", tuple(_POS_TEXT.values()),
        lambda l, r, x: _pos_ok(l, _pos_key(x)),
    ),
    StatementFamily(
        "right_pos", "the shape in the right image is {x}", tuple(_POS_TEXT.values()),
        lambda l, r, x: _pos_ok(r, _pos_key(x)),
    ),
)


def _pos_key(text: str) -> str:
    for k, v in _POS_TEXT.items():
        if v == text:
            return k
    raise KeyError(text)


def all_statements() -> list[tuple[StatementFamily, str]]:
    """Every (family, parameter) pair, in a fixed order."""
    return [(fam, p) for fam in STATEMENT_FAMILIES for p in fam.params]
