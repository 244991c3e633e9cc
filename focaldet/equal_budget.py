"""``focaldet equal-budget``: train focaldet and torchvision's RetinaNet with one recipe and
evaluate both with the same COCOeval.

Both models are built from the same config: focaldet's as ``focaldet fit`` builds it, and
torchvision's as ``RetinaNet.to_torchvision`` of that same model, so the two start from
identical weights and differ only in what each library implements -- matching, loss
normalisation, padding, anchors and postprocessing. Optimiser, schedule, data order,
augmentation, steps and evaluation are literally shared (``TorchvisionRetinaNetModule``
inherits them from ``RetinaNetModule``)::

    focaldet equal-budget -c configs/bccd.yaml                  # -> runs/equal_budget/report.md
    focaldet equal-budget -c configs/bccd.yaml --trainer.max_steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning as L

from focaldet.data.datamodule import CocoDataModule
from focaldet.module import RetinaNetModule

#: torchvision's RetinaNet v1 box loss; set on both sides so that the recipe is the same.
BOX_LOSS = "focaldet.losses.L1Loss"


def _keep_size(image, target=None):
    """Replaces ``GeneralizedRCNNTransform.resize``: the data pipeline has already resized
    the images, as it does for focaldet."""
    return image, target


class TorchvisionRetinaNetModule(RetinaNetModule):
    """``RetinaNetModule`` that trains and evaluates torchvision's RetinaNet, the twin of
    ``module.model`` (same architecture and initial weights, ``RetinaNet.to_torchvision``).

    Only the forward pass, the loss and the postprocess are torchvision's; the optimiser,
    learning-rate schedule, logging and COCO evaluation are ``RetinaNetModule``'s own.
    """

    def __init__(self, module: RetinaNetModule):
        L.LightningModule.__init__(self)
        self.save_hyperparameters(dict(module.hparams))
        self.model = module.model.to_torchvision(module.criterion)
        self.model.transform.resize = _keep_size
        self.criterion = None
        # the fields RetinaNetModule.__init__ sets beside its model and criterion
        self.label_map, self.inputs, self.init_weights_source = module.label_map, module.inputs, None
        self.slicing = None  # equal-budget runs compare unsliced evaluations
        self._init_run_state(module.run_config)

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

    def _detections(self, batch: dict) -> list[dict]:
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
    from focaldet.cli import FocaldetCLI, trainer_defaults

    parser = argparse.ArgumentParser(
        prog="focaldet equal-budget", description=__doc__.split("\n\n")[0],
        epilog="Other arguments (--trainer.*, --model.*, --data.*) are passed to both runs, as to `focaldet fit`.")
    parser.add_argument("-c", "--config", default="configs/bccd.yaml", help="training config (default %(default)s)")
    parser.add_argument("--out", default="runs/equal_budget", help="output folder (default %(default)s)")
    args, rest = parser.parse_known_args(argv)
    # the two runs are configured through LightningCLI(args=...), not through sys.argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    out = Path(args.out)
    results = {}
    for name in ("focaldet", "torchvision"):
        cli = FocaldetCLI(RetinaNetModule, CocoDataModule, trainer_defaults=trainer_defaults(), run=False,
                          save_config_kwargs={"overwrite": True},
                          args=["-c", args.config, "--model.box_loss", BOX_LOSS, *rest,
                                "--trainer.default_root_dir", str(out / name)])
        # Each CLI seeds before building its model, so both focaldet models (and the twin) start equal.
        module = cli.model if name == "focaldet" else TorchvisionRetinaNetModule(cli.model)
        print(f"\n=== {name}: {sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable "
              f"parameters, {cli.trainer.max_steps} steps ===", flush=True)
        L.seed_everything(cli.config.get("seed_everything", 0))  # the same data order and augmentation
        cli.trainer.fit(module, cli.datamodule)
        cli.trainer.validate(module, cli.datamodule, verbose=False)
        results[name] = module.last_eval
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
