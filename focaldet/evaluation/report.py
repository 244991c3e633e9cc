"""``report.html``: one page that shows an evaluation run, written by ``validate`` and ``test``.

It sits in the run folder beside the files it shows and links them by relative paths, so it
opens from the folder in any browser with no server (and survives moving the folder). It
holds the COCO table, per-class AP / AP50 / #gt with the F1 score thresholds, the TIDE
error breakdown, every picture inline (detections, PR curves, confusion matrices, errors,
training curves) and a link to every file of the folder. For a run that trained,
:func:`plot_training_curves` draws the loss, mAP and learning-rate curves from the
training run's ``metrics.csv`` into ``training_curves.png``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPORT_NAME = "report.html"
CURVES_NAME = "training_curves.png"

STAT_MEANING = {
    "mAP": "AP @ IoU .50:.95", "AP50": "AP @ IoU .50", "AP75": "AP @ IoU .75",
    "APs": "AP small (< 32² px)", "APm": "AP medium", "APl": "AP large (> 96² px)",
    "AR1": "AR, 1 detection / image", "AR10": "AR, 10 / image", "AR100": "AR, maxDets / image",
    "ARs": "AR small", "ARm": "AR medium", "ARl": "AR large",
}  # fmt: skip

_PICTURES = [  # (file name pattern, caption) in the order the report shows them
    ("{stage}_detections.png", "Detections on the first images (solid: predictions, dashed: ground truth)"),
    ("{stage}_pr_curves.png", "Precision-recall curves per class"),
    ("confusion_matrix.png", "Confusion matrix, counts"),
    ("confusion_matrix_normalized.png", "Confusion matrix, % of each true class"),
    ("errors.png", "TIDE error breakdown"),
    (CURVES_NAME, "Training curves (from the training run's metrics.csv)"),
]


# --------------------------------------------------------------------------- training curves
def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a Lightning ``metrics.csv``, empty cells dropped, values as floats."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            clean = {}
            for k, v in row.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    clean[k] = float(v)
                except ValueError:
                    continue
            rows.append(clean)
    return rows


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def has_training(rows: Sequence[Mapping[str, float]]) -> bool:
    """Whether ``metrics.csv`` rows hold a training loss (the run trained)."""
    return any("train/loss" in r for r in rows)


def training_curves_figure(rows: Sequence[Mapping[str, float]]):
    """A matplotlib ``Figure``: training losses (raw, faint, and smoothed) with the validation
    loss; validation mAP / AP50 / AP75; the learning rate when logged. x axis: optimiser step."""
    from matplotlib.figure import Figure

    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr")})
    panels = 3 if lr_keys else 2
    fig = Figure(figsize=(5.0 * panels, 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels)
    ax = axes[0]
    colors = {"loss": "C0", "loss_cls": "C1", "loss_box": "C2"}
    for name, color in colors.items():
        x, y = _series(rows, f"train/{name}")
        if not x:
            continue
        alpha = min(1.0, 10 / max(len(y), 10))  # about a tenth of the run
        ax.plot(x, y, color=color, lw=0.8, alpha=0.3)
        ax.plot(x, _ema(y, alpha), color=color, lw=1.8, label=f"train/{name}")
        vx, vy = _series(rows, f"val/{name}")
        if vx:
            ax.plot(vx, vy, color=color, lw=1.2, ls="--", marker="o", ms=4, label=f"val/{name}")
    ax.set(xlabel="step", ylabel="loss", title="Losses (faint: raw, solid: smoothed, dashed: val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax = axes[1]
    plotted = False
    for key, color in (("val/mAP", "k"), ("val/AP50", "C3"), ("val/AP75", "C4")):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, color=color, marker="o", ms=4, lw=1.5, label=key)
            plotted = True
    ax.set(xlabel="step", ylabel="AP", title="Validation AP during training", ylim=(0, None))
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no validation during training", ha="center", va="center", transform=ax.transAxes)
    if lr_keys:
        ax = axes[2]
        for key in lr_keys:
            x, y = _series(rows, key)
            ax.plot(x, y, lw=1.5, label=key)
        ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Draw ``metrics_csv``'s curves into ``path``; None (nothing written) when it holds no
    training loss."""
    rows = read_metrics_csv(metrics_csv)
    if not has_training(rows):
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training_curves_figure(rows).savefig(path)
    return path


# --------------------------------------------------------------------------- the page
def _href(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` as a URL path (``/`` separators, quoted)."""
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive (Windows): an absolute file URL
        return Path(path).resolve().as_uri()
    return quote(rel.replace(os.sep, "/"))


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)):
        return "–"
    return f"{value:.{digits}f}"


def _bar(value: float | None) -> str:
    """A number with a small horizontal bar under it (AP columns)."""
    if value is None or math.isnan(value) or value < 0:
        return "–"
    return (f'<span class="bar"><span style="width:{100 * min(max(value, 0), 1):.1f}%"></span></span>'
            f"{value:.3f}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i >= numeric_from else ""}>{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:16px 24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;
padding-bottom:4px}.sub{color:#666;margin:0 0 12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #ddd;border-radius:8px;
padding:8px 16px;min-width:110px}.card b{display:block;font-size:22px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:4px 0}th,td{border:1px solid #ddd;padding:3px 10px;
text-align:left}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;width:60px;height:8px;background:#eee;margin-right:8px;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b7dd8}
figure{margin:12px 0;background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#555;font-size:13px;margin-top:4px}
.note{color:#666}ul.files{columns:2;padding-left:18px}code{background:#eee;padding:0 3px}
"""


def draw_training_curves(train_metrics: str | os.PathLike | None, out: str | os.PathLike
                         ) -> tuple[Path | None, str | None]:
    """``training_curves.png`` in ``out`` from the training run's ``metrics.csv``, and else
    the reason why not (for the report)."""
    if train_metrics is None:
        return None, "no training curves: these weights name no training run (not saved by focaldet fit)"
    metrics = Path(train_metrics)
    if not metrics.is_file():
        return None, f"no training curves: the training run's {metrics} is not there"
    path = plot_training_curves(metrics, Path(out) / CURVES_NAME)
    return path, None if path is not None else f"no training curves: {metrics} holds no training loss"


def write_report(report: Any, out: str | os.PathLike, files: Sequence[str | os.PathLike] = (),
                 train_metrics: str | os.PathLike | None = None, curves_note: str | None = None) -> Path:
    """Write ``report.html`` for ``report`` (an :class:`~focaldet.evaluation.evaluator.EvalReport`)
    into the run folder ``out``; returns its path.

    ``files``: the files this evaluation wrote (listed first; every other file already in
    ``out`` is linked too). ``train_metrics``: the ``metrics.csv`` of the run that trained
    the evaluated weights (linked); its curves are shown when ``training_curves.png`` is in
    ``out`` (:func:`draw_training_curves`), else ``curves_note`` says why not.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c, stage = report.coco, report.stage
    parts = [f"<h1>focaldet {html.escape(stage)} report</h1>",
             f'<p class="sub">{html.escape(str(out.resolve()))} · {report.num_images} images · '
             f"maxDets {c.max_dets} · {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    cards = [("mAP", "AP @ .50:.95"), ("AP50", "AP @ .50"), ("AP75", "AP @ .75"), ("AR100", "AR @ maxDets")]
    parts.append('<div class="cards">' + "".join(
        f"<div class=card><b>{_num(c.stats.get(k))}</b><span>{html.escape(k)} · {html.escape(m)}</span></div>"
        for k, m in cards) + "</div>")

    parts.append("<h2>COCO metrics</h2>")
    parts.append(_table(["metric", "meaning", "value"],
                        [[html.escape(k), html.escape(STAT_MEANING.get(k, "")), _num(v, 4)]
                         for k, v in c.stats.items()], numeric_from=2))

    parts.append("<h2>Per class</h2>")
    th = report.thresholds
    header = ["class", "#gt", "AP", "AP50"] + (["F1 score threshold", "precision", "recall", "F1"] if th else [])
    rows = []
    for name in c.class_names:
        row = [html.escape(name), str(c.num_gt.get(name, 0)), _bar(c.per_class[name]), _bar(c.per_class_ap50[name])]
        if th:
            t = th.get(name, {})
            row += [_num(t.get("score"), 4), _num(t.get("precision")), _num(t.get("recall")), _num(t.get("f1"))]
        rows.append(row)
    if th and "all" in th:
        t = th["all"]
        rows.append(["<i>all classes pooled</i>", str(sum(c.num_gt.values())), "", "",
                     _num(t.get("score"), 4), _num(t.get("precision")), _num(t.get("recall")), _num(t.get("f1"))])
    parts.append(_table(header, rows))
    if th:
        parts.append('<p class="note">The F1 threshold of a class is the score that maximises its F1 at IoU 0.5 '
                     '(<code>thresholds.json</code>; <code>focaldet predict --model.prediction.score_threshold '
                     'thresholds.json</code> uses them).</p>')

    parts.append("<h2>Error breakdown (TIDE)</h2>")
    errors = report.errors
    if errors:
        names = list(errors["dAP"])
        parts.append(_table(["", *names, "all false positives", "all false negatives"],
                            [["dAP50 if fixed", *(_num(errors["dAP"][n]) for n in names),
                              _num(errors["dAP_special"]["false_positive"]),
                              _num(errors["dAP_special"]["false_negative"])],
                             ["count", *(str(errors["count"][n]) for n in names), "", ""]]))
        parts.append(f'<p class="note">AP50 {errors["ap50"]:.4f}; dAP = AP50 gained if the errors of that type '
                     "alone were fixed.</p>")
    else:
        parts.append('<p class="note">not computed (<code>pip install focaldet[analysis]</code> installs tidecv; '
                     "also skipped without detections or ground truth).</p>")

    parts.append("<h2>Pictures</h2>")
    shown = 0
    for pattern, caption in _PICTURES:
        p = out / pattern.format(stage=stage)
        if p.is_file():
            href = _href(p, out)
            parts.append(f'<figure><a href="{href}"><img src="{href}" alt="{html.escape(p.name)}" loading="lazy">'
                         f"</a><figcaption>{html.escape(caption)} · <code>{html.escape(p.name)}</code>"
                         "</figcaption></figure>")
            shown += 1
    if curves_note:
        parts.append(f'<p class="note">{html.escape(curves_note)}.</p>')
    if not shown:
        parts.append('<p class="note">no pictures were written.</p>')

    parts.append("<h2>Files</h2>")
    listed: list[Path] = []
    for f in [Path(p) for p in files] + sorted(p for p in out.rglob("*") if p.is_file()):
        if f.name != REPORT_NAME and f.is_file() and f.resolve() not in {x.resolve() for x in listed}:
            listed.append(f)
    if train_metrics is not None and Path(train_metrics).is_file():
        listed.append(Path(train_metrics))
    parts.append('<ul class="files">' + "".join(
        f'<li><a href="{_href(f, out)}">{html.escape(_href_label(f, out))}</a> '
        f'<span class="note">{_size(f.stat().st_size)}</span></li>' for f in listed) + "</ul>")

    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>focaldet {html.escape(stage)} · {html.escape(out.name)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


def _href_label(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base).replace(os.sep, "/")
    except ValueError:
        return str(path)
