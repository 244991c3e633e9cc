"""Studies built on the engine: parameter sweeps on Optuna (`sweep`, `sweep_study`) and
focaldet against torchvision's RetinaNet on one budget (`equal_budget`). The top layer below
`focaldet.cli` (see ``.importlinter``); importing this package imports nothing."""
