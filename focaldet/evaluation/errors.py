"""Error breakdown in TIDE's terms (``errors.json`` and a bar chart), computed by tidecv.

TIDE (Bolya et al., ECCV 2020) assigns every false positive and missed box of an IoU-0.5
evaluation one error type, then reports, per type, the AP@50 gained if errors of that
type alone were fixed (``dAP``):

- ``classification``: right place (IoU >= 0.5 with a box), wrong class;
- ``localisation``: right class, badly placed (0.1 <= IoU < 0.5 with a box of its class);
- ``both``: wrong class and badly placed;
- ``duplicate``: right class and place, but the box was already taken by a higher score;
- ``background``: on nothing (IoU < 0.1 with every box);
- ``missed``: a box no detection explains.

Plus two summaries: ``false_positive`` (the dAP if every false positive were removed) and
``false_negative`` (if every missed box were found). The numbers come from the ``tidecv``
package (the ``analysis`` extra): focaldet only converts COCO ground truth and results into
its ``Data`` objects; crowd boxes become TIDE ignore regions. All APs are in [0, 1] (tidecv
reports percent). :func:`tide_available` says whether it is installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# tidecv short name -> focaldet name, in TIDE's order
MAIN_ERRORS = {"Cls": "classification", "Loc": "localisation", "Both": "both", "Dupe": "duplicate",
               "Bkg": "background", "Miss": "missed"}
SPECIAL_ERRORS = {"FalsePos": "false_positive", "FalseNeg": "false_negative"}


def tide_available() -> bool:
    try:
        import tidecv  # noqa: F401
    except ImportError:
        return False
    return True


def tide_errors(
    gt_dataset: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    max_dets: int = 100,
    image_ids: Sequence[int] | None = None,
    pos_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> dict[str, Any] | None:
    """TIDE's breakdown of ``results`` against a COCO instances dict.

    Returns ``{"ap50": AP, "dAP": {classification, localisation, both, duplicate,
    background, missed}, "dAP_special": {false_positive, false_negative}, "count": {same
    six: number of errors}}``, or None when TIDE cannot compute it (no detection or no
    ground-truth box: its mAP divides by zero). Raises ``ImportError`` when tidecv is not
    installed.
    """
    from tidecv import TIDE, Data

    keep = None if image_ids is None else {int(i) for i in image_ids}
    gt, preds = Data("gt", max_dets=max_dets), Data("results", max_dets=max_dets)
    for cat in gt_dataset["categories"]:
        gt.add_class(int(cat["id"]), str(cat["name"]))
    for image in gt_dataset["images"]:
        if keep is None or int(image["id"]) in keep:
            gt.add_image(int(image["id"]), str(image.get("file_name", image["id"])))
    for a in gt_dataset.get("annotations", []):
        if keep is not None and int(a["image_id"]) not in keep:
            continue
        box = [float(v) for v in a["bbox"]]
        if a.get("iscrowd", 0):
            gt.add_ignore_region(int(a["image_id"]), int(a["category_id"]), box)
        else:
            gt.add_ground_truth(int(a["image_id"]), int(a["category_id"]), box)
    for r in results:
        if keep is None or int(r["image_id"]) in keep:
            preds.add_detection(int(r["image_id"]), int(r["category_id"]), float(r["score"]),
                                [float(v) for v in r["bbox"]])

    if not preds.annotations or not gt.annotations:
        return None
    tide = TIDE(pos_threshold=pos_threshold, background_threshold=background_threshold, mode=TIDE.BOX)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run = tide.evaluate(gt, preds, name="results")
            main = {e.short_name: v for e, v in run.fix_main_errors().items()}
            special = {e.short_name: v for e, v in run.fix_special_errors().items()}
            counts = {e.short_name: v for e, v in run.count_errors().items()}
    except ZeroDivisionError:  # tidecv's mAP over no class with data
        return None
    return {
        "ap50": float(run.ap) / 100,
        "dAP": {name: float(main[short]) / 100 for short, name in MAIN_ERRORS.items()},
        "dAP_special": {name: float(special[short]) / 100 for short, name in SPECIAL_ERRORS.items()},
        "count": {name: int(counts.get(short, 0)) for short, name in MAIN_ERRORS.items()},
    }


def errors_table(errors: Mapping[str, Any]) -> str:
    """The breakdown as a two-line text table (dAP in AP points x 100, and counts)."""
    names = list(MAIN_ERRORS.values())
    w = max(len(n) for n in names) + 1
    lines = [f"TIDE error breakdown (AP50 {errors['ap50']:.4f}; dAP = AP50 gained if fixed)",
             f"{'':<6}" + "".join(f"{n:>{w}}" for n in names),
             f"{'dAP':<6}" + "".join(f"{errors['dAP'][n]:>{w}.4f}" for n in names),
             f"{'count':<6}" + "".join(f"{errors['count'][n]:>{w}d}" for n in names),
             "false positives: " + f"{errors['dAP_special']['false_positive']:.4f}"
             + f", false negatives: {errors['dAP_special']['false_negative']:.4f}"]
    return "\n".join(lines)


def write_errors(errors: Mapping[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(errors, indent=2))
    return path


def errors_figure(errors: Mapping[str, Any]):
    """A matplotlib ``Figure``: bars of the six dAPs, then the two summaries."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    ax_main, ax_special = fig.subplots(1, 2, width_ratios=[3, 1])
    names = list(MAIN_ERRORS.values())
    values = [errors["dAP"][n] for n in names]
    bars = ax_main.bar(names, values, color=["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#1f77b4"])
    ax_main.bar_label(bars, [f"{v:.3f}" for v in values], fontsize=8)
    ax_main.set(ylabel="dAP50 if fixed", title=f"TIDE main errors (AP50 {errors['ap50']:.3f})")
    ax_main.tick_params(axis="x", rotation=30)
    special = list(SPECIAL_ERRORS.values())
    sv = [errors["dAP_special"][n] for n in special]
    bars = ax_special.bar(["false pos.", "false neg."], sv, color=["#17becf", "#bcbd22"])
    ax_special.bar_label(bars, [f"{v:.3f}" for v in sv], fontsize=8)
    ax_special.set(title="all FP / all FN")
    return fig


def plot_errors(errors: Mapping[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    errors_figure(errors).savefig(path)
    return path
