"""Faults injected into subprocess runs (the tests put this folder on PYTHONPATH):
``--trainer.callbacks+=faults.FailOnRank`` makes one DDP rank raise mid-training."""

from lightning.pytorch.callbacks import Callback

from focaldet.data.coco import ImageError


class FailOnRank(Callback):
    """Raises, on global rank ``rank`` only, the ImageError a bad image would give at step ``step``."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise ImageError(f"cannot read image images/bad_on_rank{self.rank}.jpg: not a decodable image")
