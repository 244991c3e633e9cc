"""``RetinaNetModule``: the Lightning wrapper around a model, its criterion and its optimiser.

It takes parts, as DETR's ``main.py`` wires them and LightningCLI configures them: the model
(`focaldet.models.RetinaNet`'s arguments), the criterion (`focaldet.losses.RetinaNetCriterion`),
an optimiser and a learning-rate schedule (Lightning's ``OptimizerCallable`` /
``LRSchedulerCallable``: any ``torch.optim`` class), and the evaluation and prediction settings.
Lightning owns the loop, DDP, AMP (``--trainer.precision``), gradient clipping
(``--trainer.gradient_clip_val``), checkpointing and logging; this module adds the detection
recipe: the linear scaling rule, COCO mAP, one inference path, and a guard against
non-finite losses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from focaldet.config.inputs import InputSettings
from focaldet.config.recipe import recipe_value
from focaldet.engine.schedules import WarmupMultiStepLR
from focaldet.errors import ConfigError, DataError, NonFiniteLossError
from focaldet.evaluation import EvaluationSettings, Evaluator, detections_to_coco
from focaldet.inference.predictor import PredictionSettings, Predictor
from focaldet.inference.slicing import Slicing
from focaldet.inference.tta import TTA
from focaldet.losses import RetinaNetCriterion
from focaldet.modeling import RetinaNet
from focaldet.modeling.weights import init_weights as load_init_weights
from focaldet.modeling.weights import print_report

CHECKPOINT_FORMAT = 3  # checkpoint["focaldet"]: 1 = {label_map, config}; 2 adds inputs, recipe in hyper_parameters;
# 3: the recipe holds parts (model, criterion, optimizer, ...), not flat arguments (focaldet.config.migrate)

# Lightning's own types (lightning.pytorch.cli), spelled here so that the module needs no CLI import
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

# what the module sets on the model itself: the classes (from the data), the background logit
# (from the criterion's class loss) and the eval resize (from the data's inputs)
MODEL_SET_BY_MODULE = ("num_classes", "background_logit", "min_size", "max_size", "size_divisibility")


# the paper's optimiser: SGD, learning rate 0.01 for 16 images, momentum 0.9, weight decay 1e-4
PAPER_SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}}


class RetinaNetModule(L.LightningModule):
    """RetinaNet training, evaluation and prediction.

    Args:
        num_classes: linked from the data module by the CLI; never typed by hand.
        model: `focaldet.models.RetinaNet` with its arguments but the classes, e.g. in YAML
            ``model: {backbone: {class_path: focaldet.models.ResNetBackbone, init_args: {depth: 18}},
            fpn_channels: 128}`` (``--model.model.fpn_channels 128``). Default: the paper's
            RetinaNet on a ResNet-50 (frozen BN, stem and stage 1 frozen). The module sets its
            classes, its background logit (when the class loss declares ``background_logit``) and
            its eval resize (the data's ``inputs``, so the model's own ``predict`` resizes as
            ``validate`` does).
        criterion: `focaldet.losses.RetinaNetCriterion`: the class and box losses (any of
            ``focaldet.losses``), the matcher, the positive-count normaliser, the crowd rule
            (``--model.criterion.cls_loss.gamma 0``). It uses the model's box coder.
        optimizer: a ``torch.optim`` class and its arguments (``{class_path: torch.optim.AdamW,
            init_args: {lr: 0.002, weight_decay: 0.05}}``, ``--model.optimizer.lr 0.02``); default
            the paper's SGD (`PAPER_SGD`). Its learning rate is for ``base_batch_size`` images.
        lr_scheduler: a ``torch.optim.lr_scheduler`` class and its arguments, stepped every
            iteration; default `focaldet.engine.schedules.WarmupMultiStepLR` (1000 warmup
            iterations, no steps; ``--model.lr_scheduler.milestones [600,750]``).
        base_batch_size: the linear scaling rule (Goyal et al.): the optimiser's learning rate
            is multiplied by the global batch (``batch_size`` x devices x nodes x gradient
            accumulation) over this; ``null`` turns the rule off.
        batch_size: per-device batch size, linked from ``data.batch_size`` by the CLI.
        decay_norm_and_bias: ``false`` exempts norm and bias parameters from weight decay.
        evaluation: `focaldet.evaluation.EvaluationSettings` (backend, ``max_dets``).
        prediction: `focaldet.inference.PredictionSettings` (``score_threshold``, ``draw``,
            ``draw_score_threshold``).
        slicing: sliced inference for ``validate``, ``test``, ``predict`` (and the validations
            of ``fit``): e.g. ``--model.slicing.size 512 --model.slicing.overlap 0.2``
            (`focaldet.inference.Slicing`). The CLI then has the data module hand over the
            original-resolution images (``data.eval_original_size``); each window and the whole
            image go through the eval pipeline of ``inputs``. An inference setting: not stored
            in the checkpoint's recipe, so ``focaldet.load`` and ``--ckpt_path`` never turn it
            on. With slicing the validation loss is not logged (it is the unsliced model's).
        tta: test-time augmentation for ``validate``, ``test``, ``predict``: ``--model.tta.flip true
            --model.tta.scales [480,640]`` (`focaldet.inference.tta.TTA`); like slicing, an
            inference setting (not in the recipe) that has the data module hand over originals.
        nonfinite: ``"raise"`` stops at a NaN/Inf loss naming the step; ``"skip"`` skips that step.
        flush_denormal: flush subnormal floats to zero on CPU. Training from scratch fills
            the N(0, 0.01)-initialised head with subnormals after a few SGD steps, which x86
            CPUs process ~7x slower (measured: 4.3 s vs 0.65 s per step); GPUs flush anyway.
        label_map: category ids and names, linked from the data module and saved in checkpoints.
        inputs: the data's eval settings (``InputSettings.to_dict()``), linked from the data module.
        init_weights: start from pretrained weights (``focaldet.modeling.weights``): a focaldet
            checkpoint of any class count, a torchvision RetinaNet state dict file (v1; v2
            with ``head_norm: gn``), a torchvision ResNet file, or a torchvision weights name
            (``RetinaNet_ResNet50_FPN_Weights.COCO_V1``, downloaded). Every tensor whose name
            and shape match is copied and a load report printed; see configs/finetune_r50_coco.yaml.
    """

    def __init__(
        self,
        num_classes: int,
        model: Callable[[int], RetinaNet] = RetinaNet,
        criterion: RetinaNetCriterion | None = None,
        optimizer: OptimizerCallable = PAPER_SGD,
        lr_scheduler: LRSchedulerCallable = WarmupMultiStepLR,
        base_batch_size: int | None = 16,
        batch_size: int = 16,
        decay_norm_and_bias: bool = True,
        evaluation: EvaluationSettings | None = None,
        prediction: PredictionSettings | None = None,
        slicing: Slicing | None = None,
        tta: TTA | None = None,
        nonfinite: str = "raise",
        flush_denormal: bool = True,
        label_map: dict | None = None,
        inputs: dict | None = None,
        init_weights: str | None = None,
    ):
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"model.nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if base_batch_size is not None and base_batch_size < 1:
            raise ConfigError(f"model.base_batch_size must be a positive number of images or null, got {base_batch_size!r}")
        self.label_map = label_map
        self.inputs = InputSettings.from_dict(inputs)
        self.criterion = criterion if criterion is not None else RetinaNetCriterion()
        model, optimizer, lr_scheduler = (_bound(part) for part in (model, optimizer, lr_scheduler))
        self.model = model(
            num_classes, **self.inputs.predict_args(),
            # the head sizes itself from what the loss declares, never from the loss's type
            background_logit=bool(getattr(self.criterion.cls_loss, "background_logit", False)),
        )
        self.criterion.box_coder = self.model.box_coder  # the criterion encodes targets as the model decodes
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.base_batch_size, self.batch_size = base_batch_size, batch_size
        self.decay_norm_and_bias, self.nonfinite, self.flush_denormal = decay_norm_and_bias, nonfinite, flush_denormal
        self.evaluation = EvaluationSettings.of(evaluation)
        self.prediction = PredictionSettings.of(prediction)
        self.slicing = Slicing.of(slicing)
        self.tta = TTA.of(tta)
        # The checkpoint's recipe (hyper_parameters): every argument, parts as class_path trees
        # (focaldet.config.recipe), so that focaldet.load and `--ckpt_path` rebuild this very model.
        # The label map and input settings are stored once each, in checkpoint["focaldet"];
        # slicing and TTA are how this run evaluates, not part of the model: kept out of the recipe.
        self.save_hyperparameters({
            "num_classes": num_classes, "model": _model_recipe(model), "criterion": _recipe(self.criterion),
            "optimizer": _recipe(optimizer), "lr_scheduler": _recipe(lr_scheduler),
            "base_batch_size": base_batch_size, "batch_size": batch_size, "decay_norm_and_bias": decay_norm_and_bias,
            "evaluation": recipe_value(self.evaluation), "prediction": recipe_value(self.prediction),
            "nonfinite": nonfinite, "flush_denormal": flush_denormal,
            "init_weights": None,  # the checkpoint's own weights replace them
        })
        self._init_run_state()
        self.init_weights_source = init_weights  # kept in checkpoint["focaldet"], for the record
        if init_weights is not None:
            print_report(load_init_weights(self.model, init_weights))

    def _init_run_state(self, run_config: str | None = None) -> None:
        """The evaluation state and stored config of a fresh module (also for subclasses that
        build their model differently)."""
        self._results: list[dict] = []
        self._preview: tuple | None = None  # first batch of validate/test, drawn as a PNG
        self.last_eval = None  # CocoEvalResult of the last validation/test epoch
        self.run_config: str | None = run_config  # resolved YAML, set by the CLI, stored in checkpoints

    # ------------------------------------------------------------------ helpers
    @property
    def class_names(self) -> list[str]:
        lm = self.label_map
        return list(lm["names"]) if lm else [str(i) for i in range(self.model.num_classes)]

    @property
    def label_to_cat_id(self) -> list[int]:
        lm = self.label_map
        return list(lm["cat_ids"]) if lm else list(range(self.model.num_classes))

    def _forward(self, batch: dict) -> dict:
        return self.model(self.model.normalize(batch["images"], batch["image_sizes"]))

    def _losses(self, batch: dict) -> dict:
        """``{"loss", "loss_cls", "loss_box", ...}`` of a training batch."""
        return self.criterion(self._forward(batch), batch["boxes"], batch["labels"], batch.get("crowd_boxes"))

    @property
    def predictor(self) -> Predictor:
        """The one inference path (`focaldet.inference.Predictor`) around this model: the
        data's eval inputs, the label map, ``score_threshold`` and ``slicing``. Built on first
        use (after a checkpoint's label map is loaded)."""
        if getattr(self, "_predictor", None) is None:
            self._predictor = Predictor(self.model, self.inputs, self.label_to_cat_id, self.class_names,
                                        score_threshold=self.prediction.score_threshold, slicing=self.slicing,
                                        tta=getattr(self, "tta", None))
        return self._predictor

    def _detect(self, batch: dict) -> list[dict]:
        """Detections of a prepared batch in each image's original pixels (the predictor's)."""
        return self.predictor.detect(batch)

    def _detect_prepared(self, batch: dict, outputs: dict | None) -> list[dict]:
        """Detections of a prepared batch in its resized pixels, by the predictor's batch rule;
        ``outputs``: the loss's forward pass over the batch, reused where the rule allows."""
        return self.predictor.detect_prepared(batch, outputs)

    def _detect_sliced(self, batch: dict) -> list[dict]:
        """Detections by slices (`focaldet.inference.slicing`) of a batch of original-resolution
        images, in their original pixels."""
        sizes, orig = batch["image_sizes"].tolist(), batch["orig_sizes"].tolist()
        bad = [(name, s, o) for name, s, o in zip(batch["file_names"], sizes, orig) if s != o]
        if bad:
            name, (h, w), (oh, ow) = bad[0]
            what = "model.slicing" if self.slicing is not None else "model.tta"
            raise ConfigError(f"{what} needs the images at their original size, but {name} arrives "
                              f"resized ({w}x{h} of {ow}x{oh}, w x h): set data.eval_original_size "
                              f"(the focaldet CLI does so whenever {what} is set)")
        images = [batch["images"][i, :, :h, :w].cpu() for i, (h, w) in enumerate(sizes)]  # (3, H, W) each
        if self.slicing is not None:
            return self.predictor.detect_sliced(images)
        return self.predictor.detect_tta(images)

    def _run_dir(self) -> Path:
        """The logger's versioned run folder (a collective under DDP: call it on every rank)."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def setup(self, stage: str) -> None:
        if self.flush_denormal:
            torch.set_flush_denormal(True)  # a no-op where unsupported; each DDP process calls it

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int):
        losses = self._losses(batch)
        loss = losses["loss"]
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_available() and dist.is_initialized():  # every rank takes the same decision
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            msg = (f"non-finite loss at step {self.global_step} (loss_cls={losses['loss_cls'].item():.4g}, "
                   f"loss_box={losses['loss_box'].item():.4g})")
            if self.nonfinite == "raise":
                raise NonFiniteLossError(msg + ": lower the learning rate, set --trainer.gradient_clip_val, "
                                         "or pass --model.nonfinite skip")
            rank_zero_info(msg + ": step skipped")
            self.log("train/skipped_steps", 1.0, reduce_fx="sum")
            return None
        n = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        return loss

    def configure_optimizers(self):
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                (no_decay if not self.decay_norm_and_bias and (is_norm or name == "bias") else decay).append(p)
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        optimizer = self.optimizer(groups)
        images = self.batch_size * world * accumulate
        scale = 1.0 if self.base_batch_size is None else images / self.base_batch_size
        for group in optimizer.param_groups:  # the linear scaling rule, before the schedule reads the rates
            group["lr"] *= scale
        lr = optimizer.param_groups[0]["lr"]
        scheduler = self.lr_scheduler(optimizer)  # (a warmup lowers the groups' rates from here)
        rule = "" if self.base_batch_size is None else f" ({lr / scale:g} x {images} / {self.base_batch_size} images)"
        rank_zero_info(f"{type(optimizer).__name__} lr {lr:g}{rule}, schedule {scheduler!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._results, self._preview = [], None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stage = "test" if self.trainer.testing else "val"
        if self.slicing is not None or self.tta is not None:  # original-resolution images in, original pixels out
            detections = self._detect_sliced(batch)
            if self._preview is None and self.trainer.is_global_zero:
                self._preview = _preview(batch, detections)
            self._results.extend(detections_to_coco(batch["image_ids"].tolist(), detections, self.label_to_cat_id))
            return
        outputs = None
        if self.criterion is not None:  # the validation loss, on the batch as training pads it
            outputs = self._forward(batch)
            losses = self.criterion(outputs, batch["boxes"], batch["labels"], batch.get("crowd_boxes"))
            self.log_dict({f"{stage}/{k}": losses[k] for k in ("loss", "loss_cls", "loss_box")},
                          batch_size=batch["images"].shape[0], sync_dist=True)
        # the predictor's batch rule: the same pass when every image pads to the batch's size
        detections = self._detect_prepared(batch, outputs)
        if self._preview is None and self.trainer.is_global_zero:
            self._preview = _preview(batch, detections)
        detections = self.predictor.to_original(batch, detections)
        self._results.extend(detections_to_coco(batch["image_ids"].tolist(), detections, self.label_to_cat_id))

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    @property
    def evaluator(self) -> Evaluator:
        return self.evaluation.evaluator(self.class_names)

    def _evaluate(self, stage: str) -> None:
        """Evaluate, log, and (``validate``/``test``, rank 0) print and write the run folder's files."""
        evaluator, full = self.evaluator, self.trainer.state.fn in ("validate", "test")
        coco_gt = self.trainer.datamodule.coco_gt(stage)
        out = self._run_dir()  # every rank: trainer.log_dir is a collective under DDP
        report = evaluator.compute(coco_gt, self._results, stage, extras=full,
                                   results_path=out / f"{stage}_detections.json")
        self._results, preview, self._preview = [], self._preview, None
        self.last_eval = report.coco
        self.log_dict(evaluator.metrics(report))
        if not self.trainer.is_global_zero:
            return
        if not self.trainer.sanity_checking:
            evaluator.log_images(report, self.trainer.loggers, self.global_step, preview,
                                 self.prediction.draw_score_threshold)
        if full:
            print(f"\n{evaluator.summary(report)}\n", flush=True)
            written = evaluator.write(report, out, preview, self.prediction.draw_score_threshold,
                                      train_metrics=self._training_metrics())
            print("wrote " + ", ".join(str(p) for p in written), flush=True)

    def on_fit_start(self) -> None:
        self._fit_run_dir = str(self._run_dir().resolve())  # every rank: log_dir is a collective

    def _training_metrics(self) -> Path | None:
        """The ``metrics.csv`` of the run that trained these weights: this process's ``fit``,
        else the one the checkpoint names (None when neither; report.html says so)."""
        run_dir = getattr(self, "_fit_run_dir", None) or getattr(self, "_checkpoint_run_dir", None)
        return None if run_dir is None else Path(run_dir) / "metrics.csv"

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        whole = self.slicing is None and self.tta is None
        detections = self._detect(batch) if whole else self._detect_sliced(batch)
        detections = self.predictor.finish(detections, names=False)  # score_threshold, category ids
        entries = detections_to_coco(batch["image_ids"].tolist(), detections, self.label_to_cat_id)
        names = dict(zip(self.label_to_cat_id, self.class_names))
        files = dict(zip(batch["image_ids"].tolist(), batch["file_names"]))
        for e in entries:
            e["file_name"], e["category_name"] = files[e["image_id"]], names[e["category_id"]]
        if self.prediction.draw:
            self._draw(batch, detections)
        return entries

    def _draw(self, batch: dict, detections: list[dict]) -> None:
        from focaldet.data import read_image
        from focaldet.visualize import save_detection_grid

        out = self._run_dir() / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        root = Path(self.trainer.datamodule.predict_images)
        for det, name in zip(detections, batch["file_names"]):
            image = torch.from_numpy(read_image(root / name)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            save_detection_grid([image], [{k: v.cpu() for k, v in det.items()}], self.class_names,
                                out / f"{Path(name).stem}.png", ncols=1,
                                score_threshold=self.prediction.draw_score_threshold)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["focaldet"] = {"format": CHECKPOINT_FORMAT, "label_map": self.label_map,
                                  "inputs": self.inputs.to_dict(), "config": self.run_config,
                                  "init_weights": self.init_weights_source,
                                  "run_dir": getattr(self, "_fit_run_dir", None)}  # report.html's curves

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming or evaluating: the checkpoint's classes must be this data's."""
        self._checkpoint_run_dir = (checkpoint.get("focaldet") or {}).get("run_dir")
        saved = (checkpoint.get("focaldet") or {}).get("label_map")
        if saved is None:
            return
        if self.label_map is None:
            self.label_map = saved
        elif list(saved["cat_ids"]) != list(self.label_map["cat_ids"]):
            raise DataError(f"the checkpoint's category ids {list(saved['cat_ids'])} differ from this data's "
                            f"{list(self.label_map['cat_ids'])}")


def _recipe(part: Any) -> dict | None:
    """The recipe of one part (an object, or a class with bound arguments); a part that cannot
    say how to rebuild it is recorded by its class only (``init_args: None``), and
    ``focaldet.load`` then refuses it by name."""
    try:
        return recipe_value(part)
    except ConfigError as e:
        rank_zero_info(f"note: {e}")
        from focaldet.config.safe_load import public_path

        cls = part.func if isinstance(part, functools.partial) else type(part)
        return {"class_path": public_path(cls) if isinstance(cls, type) else repr(cls), "init_args": None}


def _bound(part: Any) -> Callable:
    """A class to call later (``model``, ``optimizer``, ``lr_scheduler``) from itself, a class
    with bound arguments, or a ``class_path`` mapping (the defaults such as `PAPER_SGD`, or a
    Python caller's own; ``focaldet.load`` binds a checkpoint's recipe before, with its checks)."""
    if isinstance(part, Mapping):
        from focaldet.config.recipe import instantiate

        return instantiate(part, None, trust=True, bind=True)  # focaldet's defaults, or a caller's own mapping
    return part


def _model_recipe(model: Callable | None) -> dict | None:
    """The model's recipe without what the module sets itself (`MODEL_SET_BY_MODULE`)."""
    recipe = _recipe(model)
    if recipe and recipe.get("init_args"):
        recipe["init_args"] = {k: v for k, v in recipe["init_args"].items() if k not in MODEL_SET_BY_MODULE}
    return recipe


def _preview(batch: dict, detections: list[dict], max_images: int = 8) -> tuple[list, list, list]:
    """CPU copies of the first images of a batch (unpadded), their detections and ground truth."""
    images, dets, targets = [], [], []
    for i, (h, w) in enumerate(batch["image_sizes"].tolist()[:max_images]):
        images.append(batch["images"][i, :, :h, :w].cpu())
        dets.append({k: v.detach().cpu().clone() for k, v in detections[i].items()})
        keep = batch["labels"][i] >= 0
        targets.append({"boxes": batch["boxes"][i][keep].cpu(), "labels": batch["labels"][i][keep].cpu()})
    return images, dets, targets
