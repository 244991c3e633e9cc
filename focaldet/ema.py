"""Weight averaging (EMA) for focaldet runs: Lightning's `WeightAveraging` callback with the
usual decay warm-up. ``-c configs/ema.yaml`` turns it on.

What Lightning's callback does (``lightning.pytorch.callbacks.WeightAveraging``), and so what
focaldet gets:

* after every optimizer step the averaged copy (a ``torch.optim.swa_utils.AveragedModel`` of
  the whole module, parameters and BatchNorm buffers) is updated;
* each validation during ``fit`` swaps the averaged weights in and back out, so ``val/mAP``,
  the best-checkpoint choice and its file name are the averaged model's;
* every checkpoint saved during ``fit`` holds the *averaged* weights in ``state_dict`` (what
  ``focaldet.load``, ``validate/test/predict --ckpt_path`` and ``focaldet export`` read) and
  the raw ones in ``current_model_state``, with the average's update count in
  ``averaging_state``: resuming (``--ckpt_path last`` with this callback) restores both, so
  the average goes on where it stopped;
* at the end of ``fit`` the averaged weights are copied into the module.

The decay warms up as timm's ``ModelEmaV3`` (``1 - (1 + n) ** -power`` after ``n`` updates,
capped at ``decay``): an average over the first few hundred steps would otherwise be
dominated by the random initialisation, which matters on focaldet's short schedules.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from focaldet.errors import ConfigError

__all__ = ["EMA", "ema_decay"]


def ema_decay(updates: int | Tensor, decay: float, warmup_power: float | None) -> float | Tensor:
    """The decay of update number ``updates + 1``: ``min(decay, 1 - (1 + updates) ** -warmup_power)``
    (``decay`` itself without warm-up)."""
    if warmup_power is None:
        return decay
    warm = 1 - (1 + updates) ** -warmup_power
    return warm.clamp(max=decay) if isinstance(warm, Tensor) else min(decay, warm)


class EMA(WeightAveraging):
    """Exponential moving average of the weights, with decay warm-up.

    Args:
        decay: the decay after warm-up (timm's and ultralytics' 0.9998-0.9999; a run of N steps
            averages over roughly the last ``1 / (1 - decay)`` of them).
        warmup_power: the warm-up's exponent (timm: 2/3 for short runs, 3/4 for long ones);
            ``None``: a constant ``decay`` from the first step.
        update_every_n_steps: update the average every this many optimizer steps.
        use_buffers: average the BatchNorm statistics too (else they are the raw model's).
    """

    def __init__(self, decay: float = 0.9998, warmup_power: float | None = 2 / 3, update_every_n_steps: int = 1,
                 use_buffers: bool = True):
        if not 0 < decay < 1:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup_power is not None and warmup_power <= 0:
            raise ConfigError(f"EMA warmup_power must be positive or null, got {warmup_power}")
        if update_every_n_steps < 1:
            raise ConfigError(f"EMA update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay, self.warmup_power, self.update_every_n_steps = decay, warmup_power, update_every_n_steps

        def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
            d = ema_decay(num_averaged, decay, warmup_power)
            return averaged + (current - averaged) * (1 - d)

        super().__init__(use_buffers=use_buffers, avg_fn=avg_fn)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0
