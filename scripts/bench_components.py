#!/usr/bin/env python
"""Time focaldet's loss and postprocess components against an older focaldet checkout.

    git worktree add /tmp/focaldet-before 9486a0b     # hot paths before the optimisations
    python scripts/bench_components.py /tmp/focaldet-before

Both versions get the same inputs as ``focaldet bench``'s ``loss`` and ``postprocess`` cases
(batch 8, 512 px, 80 classes, 50 boxes per image); calls alternate, medians of 7 are shown.
See docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import batched_nms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focaldet.bench import Settings  # noqa: E402
from focaldet.bench.models import head_outputs, random_targets  # noqa: E402
from focaldet.losses import L1Loss, RetinaNetCriterion, SigmoidFocalLoss  # noqa: E402
from focaldet.modeling import BoxCoder, Matcher, PostProcess  # noqa: E402
from focaldet.modeling.postprocess import grouped_nms  # noqa: E402


def load_old(src: str) -> dict:
    """The classes of the focaldet package in ``src``, imported beside the current one."""
    current = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "focaldet" or m.startswith("focaldet.")}
    sys.path.insert(0, src)
    try:
        import focaldet.losses
        import focaldet.modeling

        old = {"SigmoidFocalLoss": focaldet.losses.SigmoidFocalLoss, "L1Loss": focaldet.losses.L1Loss,
               "RetinaNetCriterion": focaldet.losses.RetinaNetCriterion, "Matcher": focaldet.modeling.Matcher,
               "PostProcess": focaldet.modeling.PostProcess}
    finally:
        sys.path.remove(src)
        for m in [m for m in sys.modules if m == "focaldet" or m.startswith("focaldet.")]:
            del sys.modules[m]
        sys.modules.update(current)
    return old


def medians(fns: dict, repeats: int = 7, before=None) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):  # the first round is a warm-up
        for k in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            if before is not None:
                before()
            start = time.perf_counter()
            fns[k]()
            if i:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(src: str) -> None:
    old = load_old(src)
    settings = Settings()
    n, size, k = 8, 512, 80
    logits, deltas, anchors, _, counts = head_outputs(settings, n, size, bias_mean=-4.6, seed=3)
    boxes, labels = random_targets(n, 50, size, k, 4, "cpu")
    valid = labels >= 0
    rows = [("matcher", medians({"old": lambda: old["Matcher"]()(anchors, boxes, valid),
                                 "new": lambda: Matcher()(anchors, boxes, valid)}))]

    m = Matcher()(anchors, boxes, valid)
    target = torch.where(m.labels == 1, labels.gather(1, m.gt_index), k)
    weight = (m.labels >= 0).float()
    x = logits.clone().requires_grad_()

    def focal(cls):
        return lambda: cls()(x, target, weight).backward()

    rows.append(("focal loss, forward + backward, all 31.4M logits at once",
                 medians({"old": focal(old["SigmoidFocalLoss"]), "new": focal(SigmoidFocalLoss)},
                         before=lambda: setattr(x, "grad", None))))

    cls = [t.clone().requires_grad_() for t in logits.split(counts, 1)]
    reg = [t.clone().requires_grad_() for t in deltas.split(counts, 1)]
    outputs = {"cls_logits": cls, "box_deltas": reg, "anchors": anchors}

    def criterion(crit_cls, l1_cls):
        crit = crit_cls(box_loss=l1_cls())
        return lambda: crit(outputs, boxes, labels)["loss"].backward()

    def clear():
        for t in cls + reg:
            t.grad = None

    rows.append(("criterion (matcher + both losses), forward + backward",
                 medians({"old": criterion(old["RetinaNetCriterion"], old["L1Loss"]),
                          "new": criterion(RetinaNetCriterion, L1Loss)}, before=clear)))

    plogits, pdeltas, panchors, _, pcounts = head_outputs(settings, n, size, bias_mean=-1.1, seed=5)
    levels, dlevels = list(plogits.split(pcounts, 1)), list(pdeltas.split(pcounts, 1))
    alevels = list(panchors.split(pcounts))
    sizes = torch.tensor([[size, size]] * n)
    coder, post = BoxCoder(), PostProcess()
    with torch.no_grad():
        rows.append(("postprocess (sigmoid, top-k, decode, NMS)", medians({
            "old": lambda: old["PostProcess"]()([t.sigmoid() for t in levels], dlevels, alevels, sizes, coder),
            "new": lambda: post(levels, dlevels, alevels, sizes, coder, score_fn=torch.sigmoid)})))
        rows.append(("  its top-k of 5 levels", medians({
            "old": lambda: [t.sigmoid().reshape(n, -1).topk(1000, dim=1, sorted=False) for t in levels],
            "new": lambda: [post._topk(t) for t in levels]})))
        cand = [post._topk(t) for t in levels]
        cboxes = torch.cat([coder.decode(d.gather(1, c[1][..., None].expand(-1, -1, 4)), a[c[1]])
                            for d, a, c in zip(dlevels, alevels, cand)], 1).reshape(-1, 4)
        cscores = torch.cat([c[0].sigmoid() for c in cand], 1).reshape(-1)
        groups = (torch.arange(n)[:, None] * k + torch.cat([c[2] for c in cand], 1)).reshape(-1)
        rows.append((f"  its NMS ({len(cscores)} boxes in {groups.unique().numel()} (image, class) groups)", medians({
            "old": lambda: batched_nms(cboxes.double(), cscores.double(), groups, 0.5),
            "new": lambda: grouped_nms(cboxes, cscores, groups, 0.5)})))

    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'component':<72} {'old s':>8} {'new s':>8} {'speed-up':>9}")
    for name, r in rows:
        print(f"{name:<72} {r['old']:>8.4f} {r['new']:>8.4f} {r['old'] / r['new']:>8.1f}x")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
