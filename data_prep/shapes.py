"""A compositional image–caption set made in code, scored by construction.

Flat shapes on a light background, described by their attributes:

    "a large red circle on the left"                  one object: colour, shape, size, position
    "a green square to the left of a blue triangle"   two objects: colours, shapes, relation

Because every image is drawn from a ``Scene``, a generated image can be scored by plain pixel
statistics (colour of each object, its shape by template overlap, its size and where it is)
and a generated caption by parsing it back into a ``Scene``. Some attribute combinations are
held out of training (``Split``), so the scores measure compositional generalisation as well
as recall: GenEval's object/colour/position checks, exact and without a detector.

Edits (``Edit``, ``apply_edit``, ``edit_instruction``, ``score_edit``) turn a one-object scene
into another ("make the circle blue", "add a blue square to the right of it"): image editing
examples whose result is scored the same way, including what the instruction left alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 45, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 195, 35),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.44}  # side of the object's box, as a fraction of the image
POSITIONS = {"left": 0.25, "center": 0.5, "right": 0.75}  # centre x, as a fraction of the image
PAIR_SIZE = 0.36  # both objects of a two-object scene
BACKGROUND = (236, 234, 228)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges
T = TypeVar("T")


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str = ""  # "" in two-object scenes, whose captions do not name sizes
    position: str = ""  # "" in two-object scenes, where the relation says where

    def words(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Scene:
    """One object, or two side by side (``things[0]`` on the left)."""

    things: tuple[Thing, ...]

    def caption(self, left_first: bool = True) -> str:
        if len(self.things) == 1:
            (thing,) = self.things
            return f"a {thing.words()} {_where(thing.position)}"
        left, right = self.things
        if left_first:
            return f"a {left.words()} to the left of a {right.words()}"
        return f"a {right.words()} to the right of a {left.words()}"


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


_WORD = "|".join
_THING = rf"(?:({_WORD(SIZES)}) )?({_WORD(COLOURS)}) ({_WORD(SHAPES)})"
_ONE = re.compile(rf"^a {_THING} (?:on the (left|right)|in the (center))$")
_TWO = re.compile(rf"^a {_THING} to the (left|right) of a {_THING}$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if it is not one of this set's sentences."""
    text = " ".join(text.strip().lower().rstrip(".").split())
    if m := _ONE.match(text):
        size, colour, shape, side, center = m.groups()
        return Scene((Thing(colour, shape, size or "", side or center),)) if size else None
    if m := _TWO.match(text):
        s1, c1, h1, relation, s2, c2, h2 = m.groups()
        if s1 or s2:
            return None
        first, second = Thing(c1, h1), Thing(c2, h2)
        return Scene((first, second) if relation == "left" else (second, first))
    return None


# ---------------------------------------------------------------------------------------------
# Drawing


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int, rng: random.Random) -> np.ndarray:
    """uint8 [size, size, 3]. Positions jitter by up to 4% of the image, so no two draws of a
    scene are the same picture."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    jitter = 0.04
    if len(scene.things) == 1:
        thing = scene.things[0]
        placed = [(thing, POSITIONS[thing.position], SIZES[thing.size])]
    else:
        placed = [(scene.things[0], 0.25, PAIR_SIZE), (scene.things[1], 0.75, PAIR_SIZE)]
    for thing, cx, side in placed:
        cx, cy = cx + rng.uniform(-jitter, jitter), 0.5 + rng.uniform(-jitter, jitter)
        half = side / 2
        box = tuple(v * big for v in (cx - half, cy - half, cx + half, cy + half))
        _draw_shape(draw, thing.shape, box, COLOURS[thing.colour])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Splits: which attribute combinations training sees


def single_scenes() -> list[Scene]:
    return [
        Scene((Thing(c, s, z, p),))
        for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
    ]


def pair_scenes() -> list[Scene]:
    objects = [Thing(c, s) for c, s in itertools.product(COLOURS, SHAPES)]
    return [Scene((a, b)) for a, b in itertools.product(objects, objects) if a.colour != b.colour]


@dataclass(frozen=True)
class Split(Generic[T]):
    seen: tuple[T, ...]
    held_out: tuple[T, ...]


def make_split(scenes: list[Scene], held_out_fraction: float, seed: int) -> Split[Scene]:
    """Hold out a random ``held_out_fraction`` of the scenes, such that every pair of attribute
    values that occurs in a held-out scene still occurs in some training scene: held-out scenes
    are new combinations of known parts, never unknown parts."""
    return hold_out(scenes, held_out_fraction, seed, _values)


def hold_out(
    items: list[T], held_out_fraction: float, seed: int, values: Callable[[T], list[tuple]]
) -> Split[T]:
    """Hold out a random ``held_out_fraction`` of ``items`` such that every pair of the
    ``values`` of a held-out item occurs together in some training item."""
    rng = random.Random(seed)
    pairs = [set(itertools.combinations(values(item), 2)) for item in items]
    count = round(len(items) * held_out_fraction)
    for _ in range(1000):
        held = set(rng.sample(range(len(items)), count))
        known = set().union(*(p for i, p in enumerate(pairs) if i not in held))
        if all(pairs[i] <= known for i in held):
            return Split(
                tuple(item for i, item in enumerate(items) if i not in held),
                tuple(items[i] for i in sorted(held)),
            )
    raise ValueError(
        f"no split of {len(items)} items holds out {count} with every pair of values seen"
    )


def _values(scene: Scene) -> list[tuple]:
    return [(i, name, v) for i, t in enumerate(scene.things) for name, v in vars(t).items() if v]


# ---------------------------------------------------------------------------------------------
# Scoring generated images by construction


@dataclass(frozen=True)
class Found:
    """What the scorer sees of one object."""

    colour: str
    shape: str
    size: str
    position: str
    centre_x: float  # as a fraction of the image width
    area: int  # pixels


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, largest first."""
    seen = np.zeros_like(mask)
    parts = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        part, queue = np.zeros_like(mask), deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            part[cy, cx] = True
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(part)
    return sorted(parts, key=lambda p: -p.sum())


def _shape_of(mask: np.ndarray) -> str:
    """The shape whose drawing in the mask's bounding box overlaps the mask best (IoU)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        size = mask.shape[0] * SUPERSAMPLE
        canvas = Image.new("L", (size, size), 0)
        box = tuple(v * SUPERSAMPLE for v in (x0, y0, x1, y1))
        _draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
        drawn = np.asarray(canvas.resize(mask.shape[::-1], Image.Resampling.BOX)) >= 128
        iou = (drawn & mask).sum() / max((drawn | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def find_objects(image: np.ndarray, min_pixels: int | None = None) -> list[Found]:
    """Objects in a generated image: per palette colour, its largest connected region of pixels
    that differ from the background (estimated from the border) and are nearest a blend of
    that colour with the background: an anti-aliased edge is a blend, and the palette colour
    nearest it can be another one (a red edge is nearer yellow than red). Largest first."""
    size = image.shape[0]
    min_pixels = min_pixels if min_pixels is not None else max(4, round(0.012 * size * size))
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.abs(pixels - background).max(axis=-1) > 50
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    towards = palette - background  # [colours, 3]
    share = np.clip(
        (pixels - background) @ towards.T / (towards * towards).sum(axis=-1), 0, 1
    )  # [h, w, colours]: how much of each colour a blend nearest the pixel holds
    blends = background + share[..., None] * towards
    nearest = np.linalg.norm(pixels[..., None, :] - blends, axis=-1).argmin(axis=-1)
    found = []
    for index, colour in enumerate(COLOURS):
        parts = _components(foreground & (nearest == index))
        if not parts or parts[0].sum() < min_pixels:
            continue
        mask = parts[0]
        ys, xs = np.nonzero(mask)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        size_name = "large" if extent / size > (SIZES["small"] + SIZES["large"]) / 2 else "small"
        centre = xs.mean() / size
        position = "left" if centre < 3 / 8 else "right" if centre > 5 / 8 else "center"
        found.append(Found(colour, _shape_of(mask), size_name, position, centre, int(mask.sum())))
    return sorted(found, key=lambda f: -f.area)


def score_image(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of ``image`` as a drawing of ``scene``; ``all`` = every one."""
    objects = find_objects(image)
    if len(scene.things) == 1:
        (thing,) = scene.things
        main = objects[0] if objects else None  # the largest: stray blobs do not count
        result = {
            "colour": main is not None and main.colour == thing.colour,
            "shape": main is not None and main.shape == thing.shape,
            "size": main is not None and main.size == thing.size,
            "position": main is not None and main.position == thing.position,
        }
    else:
        by_colour = {f.colour: f for f in objects}
        left, right = (by_colour.get(t.colour) for t in scene.things)
        result = {
            "colours": left is not None and right is not None,
            "shapes": left is not None
            and right is not None
            and (left.shape, right.shape) == (scene.things[0].shape, scene.things[1].shape),
            "relation": left is not None and right is not None and left.centre_x < right.centre_x,
        }
    result["all"] = all(result.values())
    return result


# ---------------------------------------------------------------------------------------------
# Edits: an instruction turns a one-object scene into another scene


EDIT_KINDS = ("recolour", "move", "reshape", "add")
EDITED = {"recolour": "colour", "move": "position", "reshape": "shape"}  # the one it changes
ATTRIBUTES = ("colour", "shape", "size", "position")  # of a one-object scene, as scored
# Plain fixed phrasings; ``old_*`` name the object as it is, the rest the edit's values.
EDIT_TEMPLATES = {
    "recolour": (
        "make the {old_shape} {colour}",
        "paint the {old_shape} {colour}",
        "change the colour of the {old_shape} to {colour}",
    ),
    "move": ("move the {old_shape} {to}", "put the {old_shape} {where}"),
    "reshape": (
        "turn the {old_colour} {old_shape} into a {shape}",
        "make the {old_colour} {old_shape} a {shape}",
        "replace the {old_colour} {old_shape} with a {old_colour} {shape}",
    ),
    "add": (
        "add a {colour} {shape} to the {position} of it",
        "put a {colour} {shape} to the {position} of the {old_colour} {old_shape}",
        "add a {colour} {shape} on its {position}",
    ),
}


@dataclass(frozen=True)
class Edit:
    """One instruction on a one-object scene. ``recolour``, ``move`` and ``reshape`` set the
    object's colour, position or shape. ``add`` puts a second object (``colour``, ``shape``, a
    colour the scene lacks, since the scorer tells objects apart by colour) on the
    ``position`` side of it; two-object scenes have one layout (both objects PAIR_SIZE, at a
    quarter and three quarters of the width), so the original object keeps only its colour
    and shape: it takes the pair size and the other side."""

    kind: str
    colour: str = ""
    shape: str = ""
    position: str = ""


def _only(scene: Scene) -> Thing:
    if len(scene.things) != 1:
        raise ValueError(f"edits apply to one-object scenes, not '{scene.caption()}'")
    return scene.things[0]


def possible_edits(scene: Scene) -> list[Edit]:
    """Every edit of this set that changes ``scene``: each other value of one attribute, and
    each object of another colour added on either side."""
    thing = _only(scene)
    return [
        *(Edit("recolour", colour=c) for c in COLOURS if c != thing.colour),
        *(Edit("move", position=p) for p in POSITIONS if p != thing.position),
        *(Edit("reshape", shape=s) for s in SHAPES if s != thing.shape),
        *(
            Edit("add", c, s, side)
            for c, s, side in itertools.product(COLOURS, SHAPES, ("left", "right"))
            if c != thing.colour
        ),
    ]


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene ``edit`` asks for; ValueError for an edit that is not one of
    ``possible_edits(scene)`` (it would change nothing, or could not be scored)."""
    if edit not in possible_edits(scene):
        raise ValueError(f"{edit} is not an edit of '{scene.caption()}' in this set")
    thing = _only(scene)
    if edit.kind == "add":
        kept, added = Thing(thing.colour, thing.shape), Thing(edit.colour, edit.shape)
        return Scene((kept, added) if edit.position == "right" else (added, kept))
    field = EDITED[edit.kind]
    return Scene((replace(thing, **{field: getattr(edit, field)}),))


def edit_instruction(scene: Scene, edit: Edit, rng: random.Random) -> str:
    """``edit`` in words, in one of its kind's ``EDIT_TEMPLATES`` chosen by ``rng``."""
    thing = _only(scene)
    return rng.choice(EDIT_TEMPLATES[edit.kind]).format(
        old_colour=thing.colour,
        old_shape=thing.shape,
        colour=edit.colour,
        shape=edit.shape,
        position=edit.position,
        to="to the center" if edit.position == "center" else f"to the {edit.position}",
        where=_where(edit.position),
    )


def edit_split(
    sources: list[Scene], targets: list[Scene], held_out_fraction: float, seed: int
) -> dict[str, Split[tuple[Scene, Edit]]]:
    """Per edit kind, the (source, edit) cases from ``sources`` whose result is one of
    ``targets``, with ``held_out_fraction`` held out such that every pair of their parts
    (the source's attribute values, the edit's values) occurs in some training case of the
    kind: held-out edits are new combinations of known parts, as ``make_split``'s scenes."""
    allowed = set(targets)
    cases = [(s, e) for s in sources for e in possible_edits(s) if apply_edit(s, e) in allowed]
    return {
        kind: hold_out(
            [case for case in cases if case[1].kind == kind], held_out_fraction, seed, _case_values
        )
        for kind in EDIT_KINDS
    }


def _case_values(case: tuple[Scene, Edit]) -> list[tuple]:
    scene, edit = case
    return _values(scene) + [("edit", name, v) for name, v in vars(edit).items() if v]


def score_edit(image: np.ndarray, source: Scene, edit: Edit) -> dict[str, float]:
    """``exactly_right``: every attribute of the scene the edit asks for (``score_image``'s
    ``all``). ``untouched_preserved``: the share of the attributes the instruction did not
    name that are still right: the other three of a one-object scene, or for ``add`` the
    original object's colour and shape (is there an object of its colour, of its shape?).
    A true drawing of the input scores 0 and 1: the edited attribute always differs."""
    result = score_image(image, apply_edit(source, edit))
    if edit.kind == "add":
        thing = _only(source)
        kept = next((f for f in find_objects(image) if f.colour == thing.colour), None)
        untouched = [kept is not None, kept is not None and kept.shape == thing.shape]
    else:
        untouched = [result[a] for a in ATTRIBUTES if a != EDITED[edit.kind]]
    return {
        "exactly_right": float(result["all"]),
        "untouched_preserved": sum(untouched) / len(untouched),
    }


# ---------------------------------------------------------------------------------------------
# Scoring a folder of samples (mtf-generate's output)


def score_samples(directory: str | Path) -> list[tuple[str, dict[str, bool]]]:
    """(prompt, score_image result) for each prompt in ``directory/samples.jsonl`` that is one
    of this set's captions, scoring its first image ``sample_NNNN_0.png``; other prompts are
    skipped."""
    directory = Path(directory)
    results = []
    for index, line in enumerate((directory / "samples.jsonl").read_text().splitlines()):
        prompt = json.loads(line)["prompt"]
        scene, path = parse_caption(prompt), directory / f"sample_{index:04d}_0.png"
        if scene is not None and path.exists():
            image = np.asarray(Image.open(path).convert("RGB"))
            results.append((prompt, score_image(image, scene)))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.shapes", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score mtf-generate's images of shapes captions")
    score.add_argument("samples", help="a folder with samples.jsonl and sample_NNNN_0.png")
    args = parser.parse_args(argv)
    results = score_samples(args.samples)
    if not results:
        print(f"no shapes captions among the prompts in {args.samples}")
        return
    totals: dict[str, list[bool]] = {}
    for prompt, result in results:
        wrong = [k for k, ok in result.items() if not ok and k != "all"]
        print(f"  {'right' if result['all'] else 'wrong: ' + ', '.join(wrong):<24} {prompt}")
        for key, ok in result.items():
            totals.setdefault(key, []).append(ok)
    totals["all"] = totals.pop("all")  # last
    print("shapes scores: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
