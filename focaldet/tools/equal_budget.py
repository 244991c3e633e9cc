"""``focaldet equal-budget``: train focaldet and torchvision's RetinaNet with one recipe and
evaluate both with the same COCOeval.

Both models are built from the same config: focaldet's as ``focaldet fit`` builds it, and
torchvision's as ``RetinaNet.to_torchvision`` of that same model, so the two start from
identical weights and differ only in what each library implements -- matching, loss
normalisation, padding, anchors and postprocessing. Optimiser, schedule, data order,
augmentation, steps and evaluation are literally shared (``TorchvisionRetinaNetModule``
inherits them from ``RetinaNetModule``; both runs are built by ``focaldet.engine.runs``)::

    focaldet equal-budget -c configs/bccd.yaml                  # -> runs/equal_budget/report.md
    focaldet equal-budget -c configs/bccd.yaml --trainer.max_steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from focaldet.engine.module import RetinaNetModule

#: torchvision's RetinaNet v1 box loss; set on both sides so that the recipe is the same.
BOX_LOSS = "focaldet.losses.L1Loss"


def _keep_size(image, target=None):
    """Replaces ``GeneralizedRCNNTransform.resize``: the data pipeline has already resized
    the images, as it does for focaldet."""
    return image, target


class TorchvisionRetinaNetModule(RetinaNetModule):
    """``RetinaNetModule`` that trains and evaluates torchvision's RetinaNet: the twin
    (``RetinaNet.to_torchvision``, same architecture and weights) of the focaldet model that
    ``RetinaNetModule`` builds from the same arguments. Same constructor, so the CLI builds it
    from the same config; seeded alike, the two runs start from identical weights.

    Only the forward pass, the loss and the postprocess are torchvision's; the optimiser,
    learning-rate schedule, logging and COCO evaluation are ``RetinaNetModule``'s own.
    """

    def __init__(self, *args, **kwargs):
        # RetinaNetModule's own constructor (same arguments, hyperparameters, label map, input
        # settings, run state); then its model is replaced by the torchvision twin, whose loss is
        # the criterion's settings (``to_torchvision`` refuses what torchvision cannot express).
        super().__init__(*args, **kwargs)
        self.model = self.model.to_torchvision(self.criterion)
        self.model.transform.resize = _keep_size
        self.criterion = None
        self.slicing = None  # equal-budget runs compare unsliced evaluations

    @staticmethod
    def _inputs(batch: dict) -> list:
        """The padded uint8 batch as torchvision's input: a list of unpadded float images in [0, 1]."""
        return [batch["images"][i, :, :h, :w].float() / 255 for i, (h, w) in enumerate(batch["image_sizes"].tolist())]

    def _losses(self, batch: dict) -> dict:
        keep = batch["labels"] >= 0  # (N, G): padding labels are -1
        targets = [{"boxes": b[k], "labels": c[k]} for b, c, k in zip(batch["boxes"], batch["labels"], keep)]
        losses = self.model(self._inputs(batch), targets)  # {"classification", "bbox_regression"}
        return {"loss": losses["classification"] + losses["bbox_regression"],
                "loss_cls": losses["classification"].detach(), "loss_box": losses["bbox_regression"].detach()}

    def _detect_prepared(self, batch: dict, outputs: dict | None) -> list[dict]:
        """torchvision's detections of the batch, in the batch's (already resized) pixels."""
        return self.model(self._inputs(batch))


def _report(results: dict, config: str, args: list[str]) -> str:
    names = list(results)
    lines = [f"# Equal-budget accuracy: {' vs '.join(names)}", "",
             f"Config `{config}`, extra arguments `{' '.join(args) or '-'}`; same initial weights, data order,",
             "optimiser, schedule and COCOeval for both; the weights at the last step are evaluated.", "",
             "| metric | " + " | ".join(names) + " | difference |", "|---|" + "---:|" * (len(names) + 1)]
    first, second = (results[n] for n in names)
    for key in first.stats:
        a, b = first.stats[key], second.stats[key]
        if a < 0 or b < 0:  # COCOeval's -1: no ground truth in this size range
            continue
        lines.append(f"| {key} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    lines += ["", "| class (AP / AP50) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cls in first.per_class:
        cells = [f"{r.per_class[cls]:.3f} / {r.per_class_ap50[cls]:.3f}" for r in results.values()]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from focaldet.engine.runs import build_run, fit_and_evaluate

    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="focaldet equal-budget", description=__doc__.split("\n\n")[0],
        epilog="Other arguments (--trainer.*, --model.*, --data.*, --trust_checkpoint_code) are passed to both runs, "
               "as to `focaldet fit`.")
    parser.add_argument("-c", "--config", default="configs/bccd.yaml", help="training config (default %(default)s)")
    parser.add_argument("--out", default="runs/equal_budget", help="output folder (default %(default)s)")
    args, rest = parser.parse_known_args(argv)
    out = Path(args.out)
    results = {}
    for name, module_class in (("focaldet", RetinaNetModule), ("torchvision", TorchvisionRetinaNetModule)):
        # Each run seeds before building its model, so both start from the same weights.
        cli = build_run([args.config], ["--model.criterion.box_loss", BOX_LOSS, *rest], out / name, module_class)
        print(f"\n=== {name}: {sum(p.numel() for p in cli.model.parameters() if p.requires_grad):,} trainable "
              f"parameters, {cli.trainer.max_steps} steps ===", flush=True)
        results[name] = fit_and_evaluate(cli)  # the same data order and augmentation
    report = _report(results, args.config, rest)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps(
        {name: {"stats": r.stats, "per_class": r.per_class, "per_class_ap50": r.per_class_ap50}
         for name, r in results.items()}, indent=2))
    print("\n" + report + f"\nwrote {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
