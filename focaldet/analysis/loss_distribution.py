"""The paper's Figure 4 (Lin et al. 2017, section 5.1): how the focal loss is spread over
the positive and the negative examples of a trained model, for several gammas.

An example is one binary (anchor, class) logit on the val split, assigned as in training
(`RetinaNetCriterion.assign`): the positives are the positive anchors at their class; the
negatives are all K logits of the background anchors (a uniform random sample of them, with
a fixed seed, to bound memory); ignored anchors are left out. For each gamma the focal loss
of every example is computed, normalised to sum to one within the positives and within the
negatives, sorted from low to high and accumulated: ``cumulative_loss_curve``.

alpha is the paper's 0.25; being one constant within the positives (alpha) and within the
negatives (1 - alpha), it cancels in the normalisation, so the curves do not depend on it.

    focaldet analyze loss-distribution -c CONFIG --ckpt_path X --gammas 0,0.5,1,2 --out fig4.png
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from focaldet.losses.focal import sigmoid_focal_loss

ALPHA = 0.25  # the paper's
HARDEST = (0.20, 0.05)  # shares of the total loss reported per gamma (the hardest 20 % / 5 %)


def focal_loss_per_example(logits: Tensor | np.ndarray, positive: bool, gamma: float, alpha: float = ALPHA
                           ) -> np.ndarray:
    """``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` of each binary logit ``(M,)`` whose
    target is 1 (``positive``) or 0: ``(M,)`` float64 (focaldet's fp32-stable sigmoid focal loss)."""
    x = torch.as_tensor(logits, dtype=torch.float32).reshape(-1, 1)  # (M,) -> (M, 1): one "class"
    targets = torch.full_like(x, 1.0 if positive else 0.0)
    return sigmoid_focal_loss(x, targets, alpha=alpha, gamma=gamma).reshape(-1).double().numpy()


def cumulative_loss_curve(losses: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction, cumulative)``, each ``(M,)``: the losses sorted from low to high,
    normalised to sum to one; ``cumulative[i]`` is the share of the total carried by the
    ``i + 1`` easiest examples, ``fraction[i] = (i + 1) / M``."""
    losses = np.sort(np.asarray(losses, dtype=np.float64).reshape(-1))
    if losses.size == 0:
        raise ValueError("cumulative_loss_curve: no examples")
    total = losses.sum()
    cumulative = np.cumsum(losses) / total if total > 0 else np.linspace(1 / losses.size, 1.0, losses.size)
    return np.arange(1, losses.size + 1) / losses.size, cumulative


def sample_curve(fraction: np.ndarray, cumulative: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """The curve at ``points`` evenly spaced fractions of examples in [0, 1] (starting at (0, 0))."""
    grid = np.linspace(0.0, 1.0, points)
    return grid, np.interp(grid, np.concatenate([[0.0], fraction]), np.concatenate([[0.0], cumulative]))


def hardest_share(losses: np.ndarray | Sequence[float], fraction: float) -> float:
    """Share of the total loss carried by the hardest ``fraction`` of the examples (at least one)."""
    losses = np.sort(np.asarray(losses, dtype=np.float64).reshape(-1))
    total = losses.sum()
    k = max(1, int(np.ceil(fraction * losses.size)))
    return float(losses[-k:].sum() / total) if total > 0 else k / losses.size


@dataclass
class LossDistribution:
    """The logits of one model on one split: ``positives (P,)`` and ``negatives (M,)``
    (sampled), with how many background logits there were before sampling."""

    positives: np.ndarray
    negatives: np.ndarray
    num_background_logits: int
    num_images: int

    def rows(self, gammas: Iterable[float], points: int = 101) -> list[dict]:
        """One row per (panel, gamma): the counts, the hardest-20 % / 5 % shares and the curve
        sampled at ``points`` fractions."""
        rows = []
        for panel, logits, positive in (("positives", self.positives, True), ("negatives", self.negatives, False)):
            for gamma in gammas:
                loss = focal_loss_per_example(logits, positive, gamma)
                _, curve = sample_curve(*cumulative_loss_curve(loss), points=points)
                rows.append({"panel": panel, "gamma": float(gamma), "examples": int(loss.size),
                             **{f"hardest_{round(q * 100)}pct_share": hardest_share(loss, q) for q in HARDEST},
                             "curve": curve})
        return rows


@torch.inference_mode()
def collect_logits(model, criterion, batches: Iterable[dict], max_negatives: int = 1_000_000, seed: int = 0,
                   device: torch.device | str = "cpu") -> LossDistribution:
    """Positive and (a uniform sample of ``max_negatives``) negative logits of ``model``
    over ``batches`` (collated detection batches), assigned by ``criterion.assign``.

    The sample is a reservoir: every background logit draws a random key from a generator
    seeded with ``seed``, and the ``max_negatives`` smallest keys are kept."""
    gen = torch.Generator().manual_seed(seed)
    positives: list[Tensor] = []
    pool, keys = torch.empty(0), torch.empty(0)
    num_bg, num_images = 0, 0
    for batch in batches:
        images, sizes = batch["images"].to(device), batch["image_sizes"].to(device)
        outputs = model(model.normalize(images, sizes))
        crowd = batch.get("crowd_boxes")  # ignored anchors, as in training
        t = criterion.assign(outputs, batch["boxes"].to(device), batch["labels"].to(device),
                             None if crowd is None else crowd.to(device))
        logits = torch.cat(outputs["cls_logits"], dim=1).float()  # per level (N, Ri, K) -> (N, R, K)
        positives.append(logits[t.fg].gather(1, t.cls_target[t.fg][:, None])[:, 0].cpu())  # (P, K) -> (P,)
        background = (~t.fg) & (t.weight > 0)  # (N, R): neither positive nor ignored
        neg = logits[background].reshape(-1).cpu()  # (B, K) -> (B*K,)
        num_bg += neg.numel()
        num_images += len(images)
        pool = torch.cat([pool, neg])
        keys = torch.cat([keys, torch.rand(neg.numel(), generator=gen)])
        if pool.numel() > max_negatives:
            keep = keys.topk(max_negatives, largest=False).indices
            pool, keys = pool[keep], keys[keep]
    pos = torch.cat(positives) if positives else torch.empty(0)
    return LossDistribution(pos.double().numpy(), pool.double().numpy(), num_bg, num_images)


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The rows of `LossDistribution.rows` as CSV: the summary columns, then ``cum_at_F``
    for each sampled fraction F of the examples."""
    path = Path(path)
    points = len(rows[0]["curve"])
    grid = np.linspace(0.0, 1.0, points)
    summary = [k for k in rows[0] if k != "curve"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*summary, *(f"cum_at_{g:.2f}" for g in grid)])
        for row in rows:
            w.writerow([*(row[k] if not isinstance(row[k], float) else f"{row[k]:.6g}" for k in summary),
                        *(f"{v:.6f}" for v in row["curve"])])
    return path


def plot(dist: LossDistribution, gammas: Sequence[float], path: str | Path, title: str = "") -> Path:
    """The figure: cumulative normalised loss against the fraction of examples, one curve
    per gamma, positives left and negatives right (the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (panel, logits, positive) in zip(axes, (("positive", dist.positives, True),
                                                    ("negative", dist.negatives, False))):
        for gamma in gammas:
            frac, cum = cumulative_loss_curve(focal_loss_per_example(logits, positive, gamma))
            if frac.size > 4000:  # thin the line: the curve is smooth at this resolution
                frac, cum = sample_curve(frac, cum, points=2001)
            ax.plot(frac, cum, label=f"$\\gamma$ = {gamma:g}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"fraction of {panel} examples",
               ylabel="cumulative normalized loss", title=f"{panel} samples ({logits.size:,})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
