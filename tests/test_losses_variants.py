"""The focal-loss variants copied around tutorials and libraries, each reproduced by a
focaldet loss + its config in configs/losses/ (to 1e-6), with the references transcribed
as they appear in the wild."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from focaldet.losses import RetinaNetCriterion
from focaldet.losses.criterion import Targets
from focaldet.losses.normalizer import NORMALIZERS

from helpers import REPO

K = 4  # the synthetic set's classes: the configs' per-logit alphas have K + 1 values


def _from_config(name):
    """The class loss a configs/losses/NAME.yaml builds (class_path + init_args, as jsonargparse)."""
    spec = yaml.safe_load((REPO / "configs" / "losses" / f"{name}.yaml").read_text())["model"]["criterion"]["cls_loss"]
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(__import__(module, fromlist=[cls]), cls)(**spec.get("init_args", {}))


def _normalised(loss, logits, labels):
    """``loss``'s sum divided by the criterion's normaliser for it (no ignored anchors)."""
    n, r = labels.shape
    weight = torch.ones(n, r)
    fg = labels < K
    t = Targets(cls_target=labels, weight=weight, fg=fg, gt_index=torch.zeros_like(labels),
                pos_image=fg.nonzero()[:, 0], pos_anchor=fg.nonzero()[:, 1], gt_boxes=torch.zeros(0, 4),
                num_pos=fg.sum().float())
    crit = RetinaNetCriterion(loss)
    return loss(logits, labels, weight) / crit._cls_normalizer(t, logits.shape[-1], crit._pos_normalizer(t.num_pos))


def _data(num_logits, seed=0, n=3, r=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, r, num_logits, generator=g) * 3
    labels = torch.where(torch.rand(n, r, generator=g) < 0.3, torch.randint(0, K, (n, r), generator=g), K)
    return logits, labels


# ---------------------------------------------------------------- references, as in the wild
class TutorialSoftmaxFocalLoss(nn.Module):
    """The blog-post multi-class focal loss: one alpha for every class, mean over samples."""

    def __init__(self, alpha=0.25, gamma=2):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, inputs, targets):
        ce_loss = F.cross_entropy(inputs, targets, reduction="none")
        pt = torch.exp(-ce_loss)
        focal_loss = self.alpha * (1 - pt) ** self.gamma * ce_loss
        return focal_loss.mean()


def ultralytics_focal_loss(pred, label, gamma=1.5, alpha=0.25):
    """ultralytics' FocalLoss: BCE-with-logits wrapped, reduced by ``.mean(1).sum()``."""
    loss = F.binary_cross_entropy_with_logits(pred, label, reduction="none")
    pred_prob = pred.sigmoid()
    p_t = label * pred_prob + (1 - label) * (1 - pred_prob)
    modulating_factor = (1.0 - p_t) ** gamma
    loss *= modulating_factor
    if alpha > 0:
        alpha_factor = label * alpha + (1 - label) * (1 - alpha)
        loss *= alpha_factor
    return loss.mean(1).sum()


def keras_binary_crossentropy(target, output, epsilon=1e-7):
    """tf.keras 2 backend.binary_crossentropy from probabilities: clip, then log(x + eps)."""
    output = torch.clamp(output, epsilon, 1.0 - epsilon)
    bce = target * torch.log(output + epsilon)
    bce += (1 - target) * torch.log(1 - output + epsilon)
    return -bce


def keras_binary_focal_crossentropy(y_true, y_pred, apply_class_balancing=False, alpha=0.25, gamma=2.0):
    """keras.losses.BinaryFocalCrossentropy (from probabilities): mean over the last axis,
    then the Loss's sum_over_batch_size: a mean over every element."""
    bce = keras_binary_crossentropy(y_true, y_pred)
    p_t = y_true * y_pred + (1 - y_true) * (1 - y_pred)
    focal_bce = torch.pow(1.0 - p_t, gamma) * bce
    if apply_class_balancing:
        focal_bce = (y_true * alpha + (1 - y_true) * (1 - alpha)) * focal_bce
    per_sample = focal_bce.mean(-1)
    return per_sample.sum() / per_sample.numel()


def tfa_sigmoid_focal_crossentropy(y_true, y_pred, alpha=0.25, gamma=2.0):
    """tensorflow_addons.losses.sigmoid_focal_crossentropy (from probabilities): summed
    over the last axis, per sample."""
    ce = keras_binary_crossentropy(y_true, y_pred)
    p_t = (y_true * y_pred) + ((1 - y_true) * (1 - y_pred))
    alpha_factor = y_true * alpha + (1 - y_true) * (1 - alpha)
    modulating_factor = torch.pow((1.0 - p_t), gamma)
    return torch.sum(alpha_factor * modulating_factor * ce, dim=-1)


# ---------------------------------------------------------------- the variants
def test_softmax_focal_one_alpha_mean_over_samples():
    logits, labels = _data(K + 1)
    ref = TutorialSoftmaxFocalLoss(alpha=0.25, gamma=2)(logits.reshape(-1, K + 1), labels.reshape(-1))
    ours = _normalised(_from_config("softmax_focal_tutorial"), logits, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_ultralytics_bce_wrapped_focal_loss():
    logits, labels = _data(K)
    onehot = F.one_hot(labels, K + 1)[..., :K].float()
    ref = ultralytics_focal_loss(logits, onehot)  # (N, R, K): mean over anchors, sum over images and classes
    ours = _normalised(_from_config("ultralytics_focal"), logits, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_per_class_alpha_balanced_cross_entropy():
    logits, labels = _data(K + 1)
    loss = _from_config("alpha_balanced_ce")
    ref = nn.CrossEntropyLoss(weight=torch.tensor(loss.alpha))(logits.reshape(-1, K + 1), labels.reshape(-1))
    torch.testing.assert_close(_normalised(loss, logits, labels), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [3.0, 12.0])  # 12: many probabilities hit the clipping
def test_keras_binary_focal_crossentropy(scale):
    logits, labels = _data(K)
    logits = logits / 3 * scale
    onehot = F.one_hot(labels, K + 1)[..., :K].float()
    ref = keras_binary_focal_crossentropy(onehot, logits.sigmoid())
    torch.testing.assert_close(_normalised(_from_config("keras_focal"), logits, labels), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [3.0, 12.0])
def test_tfa_sigmoid_focal_crossentropy(scale):
    logits, labels = _data(K)
    logits = logits / 3 * scale
    onehot = F.one_hot(labels, K + 1)[..., :K].float()
    ref = tfa_sigmoid_focal_crossentropy(onehot, logits.sigmoid()).mean()  # the usual reduce_mean
    torch.testing.assert_close(_normalised(_from_config("tfa_focal"), logits, labels), ref, rtol=1e-6, atol=1e-6)


def test_softmax_per_logit_alpha_is_validated_and_documented():
    from focaldet.losses import SoftmaxFocalLoss

    logits, labels = _data(K + 1)
    with pytest.raises(ValueError, match="per-logit alpha has 3 values for 5 logits"):
        SoftmaxFocalLoss(alpha=[0.1, 0.2, 0.3])(logits, labels, torch.ones(labels.shape))
    # a float alpha is the K + 1 list (alpha, ..., alpha, 1 - alpha)
    a = SoftmaxFocalLoss(alpha=0.3)(logits, labels, torch.ones(labels.shape))
    b = SoftmaxFocalLoss(alpha=[0.3] * K + [0.7])(logits, labels, torch.ones(labels.shape))
    torch.testing.assert_close(a, b)


def test_unknown_normalizer_is_one_clear_error():
    from focaldet.losses import SigmoidFocalLoss

    with pytest.raises(ValueError, match="unknown normalizer 'mean'.*num_pos"):
        SigmoidFocalLoss(normalizer="mean")
    assert set(NORMALIZERS) == {"num_pos", "num_samples", "num_logits", "num_anchors", "weighted_samples"}


def test_mean_over_samples_through_the_criterion_skips_ignored_anchors():
    """Through assign(): num_samples divides by the non-ignored anchors, whatever the matcher ignored."""
    from focaldet.losses import SoftmaxFocalLoss
    from test_criterion import _outputs, _targets

    outputs = _outputs(4, num_logits=K)  # the criterion's tests: K = 3 classes + background
    boxes, labels = _targets()
    crit = RetinaNetCriterion(SoftmaxFocalLoss(alpha=0.25, background_alpha=0.25, normalizer="num_samples"))
    t = crit.assign(outputs, boxes, labels)
    logits = torch.cat(outputs["cls_logits"], 1)
    keep = t.weight > 0
    ref = TutorialSoftmaxFocalLoss()(logits[keep], t.cls_target[keep])
    torch.testing.assert_close(crit(outputs, boxes, labels)["loss_cls"], ref.detach(), rtol=1e-6, atol=1e-6)
    assert int((~keep).sum()) > 0  # the example does ignore anchors


def test_loss_parameters_are_cli_flags_for_sweeps(synth_coco, tmp_path):
    """``--model.criterion.cls_loss.gamma`` etc. override a stacked loss config (what a sweep sets)."""
    from test_configs import _data_overrides, _instantiate

    cli = _instantiate(["-c", str(REPO / "configs" / "synth.yaml"), "-c", str(REPO / "configs" / "losses" / "varifocal.yaml"),
                        *_data_overrides(synth_coco), "--trainer.default_root_dir", str(tmp_path),
                        "--model.criterion.cls_loss.gamma", "0.5", "--model.criterion.cls_loss.alpha", "0.6",
                        "--model.criterion.cls_loss.normalizer", "num_samples",
                        "--model.criterion.box_loss", "focaldet.losses.CIoULoss"])
    loss = cli.model.criterion.cls_loss
    assert (type(loss).__name__, loss.gamma, loss.alpha, loss.normalizer) == ("VarifocalLoss", 0.5, 0.6, "num_samples")
    assert type(cli.model.criterion.box_loss).__name__ == "CIoULoss"
