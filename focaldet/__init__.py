"""focaldet: RetinaNet with swappable losses, as a Lightning plugin.

``focaldet.load(checkpoint) -> Detector`` runs a trained model without its training setup
(see `focaldet.api`); it is imported on first use, so ``import focaldet`` stays cheap.
"""

__all__ = ["Detector", "load"]


def __getattr__(name: str):
    if name in __all__:
        from focaldet import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
