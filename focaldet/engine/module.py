"""``RetinaNetModule``: the Lightning wrapper around model + criterion.

Lightning owns the loop, DDP, AMP (``--trainer.precision``), gradient clipping
(``--trainer.gradient_clip_val``), checkpointing and logging; this module adds the
detection recipe: SGD with the linear-scaling rule, warmup + multi-step decay, COCO mAP,
and a guard against non-finite losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from focaldet.errors import ConfigError, DataError, NonFiniteLossError
from focaldet.evaluation import Evaluator, detections_to_coco
from focaldet.evaluation.coco import DEFAULT_BACKEND
from focaldet.inference.predictor import Predictor
from focaldet.inference.slicing import Slicing
from focaldet.inference.tta import TTA
from focaldet.config.inputs import InputSettings
from focaldet.losses import RetinaNetCriterion
from focaldet.losses.criterion import CROWD_IOA_THRESHOLD
from focaldet.modeling import AnchorGenerator, Matcher, PostProcess, RetinaNet
from focaldet.modeling.weights import init_weights as load_init_weights
from focaldet.modeling.weights import print_report
from focaldet.config.recipe import describe

OBJECT_ARGS = ("backbone", "anchor_generator", "matcher", "postprocess", "cls_loss", "box_loss")
CHECKPOINT_FORMAT = 2  # checkpoint["focaldet"]: 1 = {label_map, config}; 2 adds inputs, recipe in hyper_parameters


class RetinaNetModule(L.LightningModule):
    """RetinaNet training, evaluation and prediction.

    Model (see ``focaldet.models.RetinaNet``):
        num_classes: linked from the data module by the CLI; never typed by hand.
        backbone: e.g. ``{class_path: focaldet.models.ResNetBackbone, init_args: {depth: 18}}``;
            default ResNet-50, frozen BN, stem and stage 1 frozen.
        anchor_generator, matcher, postprocess: plain objects, paper defaults when omitted.
        cls_loss: any class loss of ``focaldet.losses`` (default ``SigmoidFocalLoss``).
        box_loss: any box loss of ``focaldet.losses`` (default ``SmoothL1Loss``).
        fpn_channels, p6_from, num_convs, head_norm, prior_prob: see ``RetinaNet``.
        normalizer_momentum: EMA of the positive count (detectron2: 0.9); None = per batch.
        crowd_ioa_threshold: a background anchor whose intersection with an ``iscrowd`` region
            of its image, over the anchor's area, is at least this is ignored in the loss
            instead of trained as background (``RetinaNetCriterion``; positives stay positive);
            ``null`` turns it off (crowd regions are then dropped, as before).
        init_weights: start from pretrained weights (``focaldet.modeling.weights``): a focaldet
            checkpoint of any class count, a torchvision RetinaNet state dict file (v1; v2
            with ``head_norm: gn``), a torchvision ResNet file, or a torchvision weights name
            (``RetinaNet_ResNet50_FPN_Weights.COCO_V1``, downloaded). Every tensor whose name
            and shape match is copied and a load report printed; see configs/finetune_r50_coco.yaml.
    Optimisation:
        base_lr: learning rate for ``base_batch_size`` images; scaled linearly with the
            global batch (``batch_size`` x devices x nodes x gradient accumulation).
        batch_size: per-device batch size, linked from ``data.batch_size`` by the CLI.
        optimizer: ``"sgd"`` (the paper's recipe) or ``"adamw"`` (converges faster when
            training small models from scratch, as in ``configs/synth.yaml``).
        momentum, weight_decay: SGD momentum and (both optimizers) weight decay;
            ``decay_norm_and_bias=False`` exempts norm and bias parameters.
        warmup_iters, warmup_factor: linear warmup from ``base_lr * warmup_factor``.
        lr_steps, lr_gamma: multiply the learning rate by ``lr_gamma`` at these iterations.
        nonfinite: ``"raise"`` stops at a NaN/Inf loss naming the step; ``"skip"`` skips that step.
    Evaluation / prediction:
        eval_backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (same numbers, slower).
        label_map: category ids and names, linked from the data module and saved in checkpoints.
        inputs: the data's eval settings (``InputSettings.to_dict()``), linked from the data
            module: the model's own ``predict`` resizes and pads as ``validate`` does.
        draw_predictions: ``predict`` also writes images with the detections drawn.
        draw_score_threshold: minimum score of the drawn detections (validate draws at the
            F1 thresholds it computes).
        max_dets: detections per image COCOeval evaluates (COCO's 100); for crowded scenes
            raise it together with ``postprocess.detections_per_img``.
        score_threshold: ``predict`` keeps detections scoring at least this: a number, or
            the path of a ``thresholds.json`` written by ``validate`` (per class). Default:
            everything the postprocess keeps.
        slicing: sliced inference for ``validate``, ``test``, ``predict`` (and the validations
            of ``fit``): e.g. ``--model.slicing.size 512 --model.slicing.overlap 0.2
            --model.slicing.full_image true`` (`focaldet.inference.Slicing`). The CLI then has
            the data module hand over the original-resolution images
            (``data.eval_original_size``); each window and the whole image go through the
            eval pipeline of ``inputs`` here. An inference setting: not stored in the
            checkpoint's recipe, so ``focaldet.load`` and ``--ckpt_path`` never turn it on.
            With slicing the validation loss is not logged (it is the unsliced model's).
        tta: test-time augmentation for ``validate``, ``test``, ``predict``: ``--model.tta.flip true
            --model.tta.scales [480,640]`` (`focaldet.inference.tta.TTA`): each image also run
            mirrored and at those shorter sides, merged by class-wise NMS; like slicing, an
            inference setting (not in the recipe) that has the data module hand over originals.
        channels_last: run the model in NHWC memory order (``RetinaNet(channels_last=...)``):
            faster with oneDNN on CPU and with tensor cores on GPU.
        flush_denormal: flush subnormal floats to zero on CPU. Training from scratch fills
            the N(0, 0.01)-initialised head with subnormals after a few SGD steps, which x86
            CPUs process ~7x slower (measured: 4.3 s vs 0.65 s per step); GPUs flush anyway.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        anchor_generator: AnchorGenerator | None = None,
        matcher: Matcher | None = None,
        postprocess: PostProcess | None = None,
        cls_loss: nn.Module | None = None,
        box_loss: nn.Module | None = None,
        fpn_channels: int = 256,
        p6_from: str = "c5",
        num_convs: int = 4,
        head_norm: str | None = None,
        prior_prob: float = 0.01,
        normalizer_momentum: float | None = None,
        crowd_ioa_threshold: float | None = CROWD_IOA_THRESHOLD,
        base_lr: float = 0.01,
        base_batch_size: int = 16,
        batch_size: int = 16,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = True,
        warmup_iters: int = 1000,
        warmup_factor: float = 0.001,
        lr_steps: list[int] | None = None,
        lr_gamma: float = 0.1,
        nonfinite: str = "raise",
        eval_backend: str = DEFAULT_BACKEND,
        label_map: dict | None = None,
        inputs: dict | None = None,
        draw_predictions: bool = False,
        draw_score_threshold: float = 0.3,
        max_dets: int = 100,
        score_threshold: float | str | None = None,
        slicing: Slicing | None = None,
        tta: TTA | None = None,
        channels_last: bool = True,
        flush_denormal: bool = True,
        init_weights: str | None = None,
    ):
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"model.optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"model.nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if crowd_ioa_threshold is not None and not 0 < crowd_ioa_threshold <= 1:
            raise ConfigError(f"model.crowd_ioa_threshold must be in (0, 1] or null (off), got {crowd_ioa_threshold!r}")
        # The checkpoint's recipe (hyper_parameters): every argument, parts as class_path trees
        # (focaldet.config.recipe), so that focaldet.load and `--ckpt_path` rebuild this very model.
        # The label map and input settings are stored once each, in checkpoint["focaldet"].
        # Slicing is how this run evaluates, not part of the model: kept out of the recipe.
        self.save_hyperparameters(ignore=[*OBJECT_ARGS, "label_map", "inputs", "slicing", "tta"])
        objects = dict(backbone=backbone, anchor_generator=anchor_generator, matcher=matcher,
                       postprocess=postprocess, cls_loss=cls_loss, box_loss=box_loss)
        self.hparams.update({name: _describe(obj) for name, obj in objects.items()})
        self.label_map = label_map
        self.inputs = InputSettings.from_dict(inputs)
        self.slicing = Slicing.of(slicing)
        self.tta = TTA.of(tta)
        self.model = RetinaNet(
            num_classes, backbone=backbone, anchor_generator=anchor_generator, postprocess=postprocess,
            fpn_channels=fpn_channels, p6_from=p6_from, num_convs=num_convs, head_norm=head_norm,
            prior_prob=prior_prob, channels_last=channels_last, **self.inputs.predict_args(),
            # the head sizes itself from what the loss declares, never from the loss's type
            background_logit=bool(getattr(cls_loss, "background_logit", False)),
        )
        self.criterion = RetinaNetCriterion(cls_loss, box_loss, matcher, self.model.box_coder,
                                            normalizer_momentum=normalizer_momentum,
                                            crowd_ioa_threshold=crowd_ioa_threshold)
        self._init_run_state()
        self.init_weights_source = init_weights  # kept in checkpoint["focaldet"], for the record
        self.hparams["init_weights"] = None  # the checkpoint's own weights replace them
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
        return list(lm["names"]) if lm else [str(i) for i in range(self.hparams.num_classes)]

    @property
    def label_to_cat_id(self) -> list[int]:
        lm = self.label_map
        return list(lm["cat_ids"]) if lm else list(range(self.hparams.num_classes))

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
                                        score_threshold=self.hparams.get("score_threshold"), slicing=self.slicing,
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
        if self.hparams.flush_denormal:
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
            if self.hparams.nonfinite == "raise":
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
        hp = self.hparams
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        lr = hp.base_lr * hp.batch_size * world * accumulate / hp.base_batch_size
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                (no_decay if not hp.decay_norm_and_bias and (is_norm or name == "bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        steps = sorted(hp.lr_steps or [])

        def factor(it: int) -> float:
            warm = 1.0 if it >= hp.warmup_iters else hp.warmup_factor + (1 - hp.warmup_factor) * it / hp.warmup_iters
            return warm * hp.lr_gamma ** sum(it >= s for s in steps)

        rank_zero_info(f"{hp.optimizer} lr {lr:g} (base {hp.base_lr:g} x {hp.batch_size * world * accumulate} / "
                       f"{hp.base_batch_size} images), warmup {hp.warmup_iters} it, decay at {steps}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
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
        return Evaluator(self.class_names, backend=self.hparams.eval_backend,
                         max_dets=self.hparams.get("max_dets", 100))

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
                                 self.hparams.draw_score_threshold)
        if full:
            print(f"\n{evaluator.summary(report)}\n", flush=True)
            written = evaluator.write(report, out, preview, self.hparams.draw_score_threshold,
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
        if self.hparams.draw_predictions:
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
                                score_threshold=self.hparams.draw_score_threshold)

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


def _describe(obj: Any) -> dict | None:
    """The recipe of one part; a part that cannot say how to rebuild it is recorded by its
    class only (``init_args: None``), and ``focaldet.load`` then refuses it by name."""
    try:
        return describe(obj)
    except ConfigError as e:
        rank_zero_info(f"note: {e}")
        from focaldet.config.safe_load import public_path

        return {"class_path": public_path(type(obj)), "init_args": None}


def _preview(batch: dict, detections: list[dict], max_images: int = 8) -> tuple[list, list, list]:
    """CPU copies of the first images of a batch (unpadded), their detections and ground truth."""
    images, dets, targets = [], [], []
    for i, (h, w) in enumerate(batch["image_sizes"].tolist()[:max_images]):
        images.append(batch["images"][i, :, :h, :w].cpu())
        dets.append({k: v.detach().cpu().clone() for k, v in detections[i].items()})
        keep = batch["labels"][i] >= 0
        targets.append({"boxes": batch["boxes"][i][keep].cpu(), "labels": batch["labels"][i][keep].cpu()})
    return images, dets, targets
