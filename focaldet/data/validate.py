"""The one validation of a COCO instances JSON, used by the loader and by the data doctor.

`validate_coco` checks the parsed JSON entry by entry and returns a `CocoValidation`: the
valid images, categories and trainable boxes, and `Problems` -- every offending entry,
grouped by kind, each named by its image / annotation / category id (and file). The
loader (`focaldet.data.coco.load_coco`) raises one `DataError` listing the errors;
``focaldet data check`` prints errors, warnings and statistics.

The rules:

- ids (image, annotation, category) are integers (not booleans) within int64, unique;
- an image has a non-empty string ``file_name`` and ``width``/``height`` that are whole
  numbers of pixels >= 1;
- an annotation refers to an existing image and category; its ``bbox`` is four finite
  numbers ``[x, y, w, h]`` with ``w, h >= 0``; ``iscrowd`` is 0 or 1 and ``area`` a finite
  number when present (missing ones are filled in by the loader: the evaluator needs them);
- warnings: boxes of at most ``MIN_BOX_SIDE`` px after clipping to the image (not trained
  on), boxes running past the border (clipped) -- ``iscrowd`` regions included, marked
  "(crowd)" --, several image entries sharing a file, and a
  large share of boxes past the border, the mark of ``[x1, y1, x2, y2]`` boxes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KINDS",
    "MIN_BOX_SIDE",
    "CocoValidation",
    "Problems",
    "clip_box",
    "validate_coco",
]

# A box narrower or lower than this (pixels, after clipping to the image) is not trained on.
MIN_BOX_SIDE = 1.0
# A box "runs past the border" when it extends more than this many pixels outside its image;
# when more than XYXY_SHARE of the boxes do, they are probably not COCO xywh.
BORDER_TOLERANCE = 2.0
XYXY_SHARE = 0.2
XYXY_MIN_BOXES = 20
MAX_EXAMPLES = 10  # ids quoted per problem kind
_INT64 = 2**63
_MAX_SIDE = 2**31 - 1

# kind -> (severity, description); problems are rendered per kind, in this order.
KINDS: dict[str, tuple[str, str]] = {
    "structure": ("error", "invalid file structure"),
    "no_categories": ("error", "no categories"),
    "bad_image": ("error", "invalid image entries"),
    "dup_image": ("error", "duplicate image ids"),
    "bad_category": ("error", "invalid category entries"),
    "dup_category": ("error", "duplicate category ids"),
    "bad_annotation": ("error", "invalid annotation entries"),
    "dup_annotation": ("error", "duplicate annotation ids"),
    "unknown_image": ("error", "annotations referring to an image id that is not in 'images'"),
    "unknown_category": ("error", "annotations with a category id that is not in 'categories'"),
    "bad_bbox": ("error", "annotations without a valid bbox [x, y, w, h]"),
    # image files (filled in by the doctor and the data module's image scan)
    "missing_file": ("error", "missing image files"),
    "unreadable": ("error", "undecodable image files"),
    "size_mismatch": ("error", "images whose size differs from their JSON width/height"),
    "truncated": ("warning", "truncated JPEGs (end marker missing), read with their lost rows gray"),
    "dup_file": ("warning", "image entries sharing a file_name"),
    "degenerate": ("warning", f"boxes <= {MIN_BOX_SIDE:g} px wide or high after clipping, not trained on"),
    "outside": ("warning", "boxes extending outside their image, clipped for training"),
    "xyxy": ("warning", "boxes running past the image border"),
    "empty_category": ("warning", "categories without boxes"),
    "exif": ("info", "images with an EXIF orientation, turned/flipped on reading (boxes must fit the turned image)"),
    "conversion": ("info", "images converted to 8-bit RGB on reading"),
    "format": ("info", "files whose content is not the format their name says"),
}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


class Problems:
    """Offending entries per problem kind; renders one message per kind (ids quoted up to
    ``MAX_EXAMPLES``, then a count)."""

    def __init__(self) -> None:
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter = Counter()
        self.notes: dict[str, str] = {}

    def add(self, kind: str, example: str) -> None:
        if kind not in KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)

    def note(self, kind: str, text: str) -> None:
        """A sentence appended to the kind's message (e.g. a hint what to do)."""
        self.notes[kind] = text

    def message(self, kind: str) -> str | None:
        """``"description (count): example; example ..."`` of one kind, ``None`` if it did not occur."""
        n = self.counts[kind]
        if not n:
            return None
        more = f"; ... ({n - MAX_EXAMPLES} more)" if n > MAX_EXAMPLES else ""
        note = f" -- {self.notes[kind]}" if kind in self.notes else ""
        return f"{KINDS[kind][1]} ({n}): {'; '.join(self.examples[kind])}{more}{note}"

    def render(self, severities: tuple[str, ...] = ("error", "warning", "info")) -> list[tuple[str, str]]:
        """``[(severity, message)]``, errors first, in `KINDS` order."""
        kinds = sorted(KINDS, key=lambda kind: _SEVERITY_ORDER[KINDS[kind][0]])
        return [(KINDS[k][0], self.message(k)) for k in kinds if self.counts[k] and KINDS[k][0] in severities]

    @property
    def errors(self) -> list[str]:
        return [m for _, m in self.render(("error",))]

    def count(self, severity: str) -> int:
        return sum(n for kind, n in self.counts.items() if KINDS[kind][0] == severity)


@dataclass
class CocoValidation:
    """What `validate_coco` found.

    ``images``: valid image entries by id; ``categories``: category id -> name;
    ``boxes``: image id -> ``[(annotation id, category id, (x1, y1, x2, y2))]``, the boxes
    training uses (non-crowd, clipped, larger than ``MIN_BOX_SIDE``); ``crowd``: the same for
    the ``iscrowd`` regions (same rules), whose anchors training ignores; ``num_boxes`` counts
    every annotation with a valid bbox, ``num_crowd`` the crowd ones among them.
    """

    images: dict[int, dict] = field(default_factory=dict)
    categories: dict[int, str] = field(default_factory=dict)
    boxes: dict[int, list[tuple[int, int, tuple[float, float, float, float]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    crowd: dict[int, list[tuple[int, int, tuple[float, float, float, float]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    num_boxes: int = 0
    num_crowd: int = 0
    problems: Problems = field(default_factory=Problems)


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _is_number(v: Any) -> bool:
    """A finite int or float; booleans are not numbers, nor are ints beyond float range."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _is_side(v: Any) -> bool:
    """A whole number of pixels in ``1 .. 2**31 - 1`` (``640`` or ``640.0``)."""
    return _is_number(v) and v == int(v) and 1 <= v <= _MAX_SIDE


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_box(bbox: Any, width: float, height: float) -> tuple[float, float, float, float] | None:
    """A valid COCO ``[x, y, w, h]`` clipped to a ``width x height`` image as ``xyxy``;
    ``None`` when it is at most ``MIN_BOX_SIDE`` wide or high after clipping."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 <= MIN_BOX_SIDE or y2 - y1 <= MIN_BOX_SIDE:
        return None
    return x1, y1, x2, y2


def _bbox_problem(bbox: Any) -> str | None:
    """Why ``bbox`` is not a COCO ``[x, y, w, h]``, or ``None``."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {_short(bbox)} is not a list of 4 numbers"
    if not all(_is_number(v) for v in bbox):
        return f"bbox {_short(bbox)} holds a value that is not a finite number"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {_short(bbox)} has a negative width or height"
    return None


# --------------------------------------------------------------------------------------
# The validation
# --------------------------------------------------------------------------------------


def validate_coco(data: Any) -> CocoValidation:
    """Check a parsed COCO instances JSON (see the module docstring for the rules)."""
    out = CocoValidation()
    problems = out.problems
    if not isinstance(data, Mapping):
        problems.add("structure", f"expected a JSON object with 'images' and 'categories', got {type(data).__name__}")
        return out
    lists = {}
    for key in ("images", "annotations", "categories"):
        value = data.get(key, [] if key == "annotations" else None)
        if not isinstance(value, list):
            problems.add("structure", f"missing or invalid '{key}' list")
        lists[key] = value if isinstance(value, list) else []

    invalid_images: set = set()  # ids of invalid entries: their annotations are not reported again
    file_names: dict[str, int] = {}
    for i, img in enumerate(lists["images"]):
        if not isinstance(img, Mapping):
            problems.add("bad_image", f"images[{i}] is {_short(img)}, not an object")
            continue
        image_id = img.get("id")
        if not _is_id(image_id):
            problems.add("bad_image", f"images[{i}]: id {_short(image_id)} is not an integer")
            continue
        where = f"image {image_id}"
        reasons = []
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            reasons.append(f"file_name {_short(file_name)} is not a file name")
        else:
            where += f" ({file_name})"
        for key in ("width", "height"):
            if key not in img:
                reasons.append(f"no '{key}'")
            elif not _is_side(img[key]):
                reasons.append(f"{key} {_short(img[key])} is not a whole number of pixels >= 1")
        if image_id in out.images or image_id in invalid_images:
            problems.add("dup_image", where)
            continue
        if reasons:
            problems.add("bad_image", f"{where}: {', '.join(reasons)}")
            invalid_images.add(image_id)
            continue
        out.images[image_id] = img
        if file_name in file_names:
            problems.add("dup_file", f"images {file_names[file_name]} and {image_id} ({file_name})")
        file_names.setdefault(file_name, image_id)

    for i, cat in enumerate(lists["categories"]):
        if not isinstance(cat, Mapping):
            problems.add("bad_category", f"categories[{i}] is {_short(cat)}, not an object")
            continue
        cid = cat.get("id")
        if not _is_id(cid):
            problems.add("bad_category", f"categories[{i}]: id {_short(cid)} is not an integer")
        elif cid in out.categories:
            problems.add("dup_category", f"category {cid}")
        elif "name" in cat and not isinstance(cat["name"], str):
            problems.add("bad_category", f"category {cid}: name {_short(cat['name'])} is not a string")
        else:
            out.categories[cid] = str(cat.get("name", cid))
    if isinstance(data.get("categories"), list) and not lists["categories"]:
        problems.add("no_categories", "the 'categories' list is empty")

    ann_ids: set = set()
    placed = past_border = 0  # non-crowd boxes on a known image; those more than BORDER_TOLERANCE px outside
    for i, ann in enumerate(lists["annotations"]):
        if not isinstance(ann, Mapping):
            problems.add("bad_annotation", f"annotations[{i}] is {_short(ann)}, not an object")
            continue
        aid = ann.get("id")
        if not _is_id(aid):
            problems.add("bad_annotation", f"annotations[{i}]: id {_short(aid)} is not an integer")
            continue
        if aid in ann_ids:
            problems.add("dup_annotation", f"annotation {aid}")
            continue
        ann_ids.add(aid)
        image_id = ann.get("image_id")
        img = out.images.get(image_id) if _is_id(image_id) else None
        where = f"annotation {aid}" + (f" (image {image_id}, {img['file_name']})" if img is not None else "")
        reasons = []
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):  # True/False compare equal to 1/0
            reasons.append(f"iscrowd {_short(ann['iscrowd'])} is not 0 or 1")
        if "area" in ann and not _is_number(ann["area"]):
            reasons.append(f"area {_short(ann['area'])} is not a finite number")
        if reasons:
            problems.add("bad_annotation", f"{where}: {', '.join(reasons)}")
            continue
        bad_bbox = _bbox_problem(ann.get("bbox")) if "bbox" in ann else "no 'bbox'"
        if bad_bbox is not None:
            problems.add("bad_bbox", f"{where}: {bad_bbox}")
            continue
        out.num_boxes += 1
        if img is None:
            if not (_is_id(image_id) and image_id in invalid_images):
                problems.add("unknown_image", f"annotation {aid} (image id {_short(image_id)})")
            continue
        cid = ann.get("category_id")
        if not (_is_id(cid) and cid in out.categories):
            problems.add("unknown_category", f"annotation {aid} (category id {_short(cid)})")
            continue
        crowd = bool(ann.get("iscrowd", 0))
        out.num_crowd += crowd
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = float(img["width"]), float(img["height"])
        outside = max(-x, -y, x + w - width, y + h - height)
        if not crowd:  # crowd regions (a few, drawn around groups) stay out of the xyxy heuristic
            placed += 1
            past_border += outside > BORDER_TOLERANCE
        box = clip_box(ann["bbox"], width, height)
        if crowd:
            where += " (crowd)"
        if box is None:
            problems.add("degenerate", where)
            continue
        if outside > 0:
            problems.add("outside", where)
        (out.crowd if crowd else out.boxes)[image_id].append((aid, cid, box))

    if placed >= XYXY_MIN_BOXES and past_border > XYXY_SHARE * placed:
        problems.add("xyxy", f"{past_border} of {placed} boxes ({past_border / placed:.0%}) extend more than "
                             f"{BORDER_TOLERANCE:g} px past it")
        problems.note("xyxy", "are the bboxes [x1, y1, x2, y2] (xyxy) instead of COCO's [x, y, width, height]?")
    return out
