"""The training engine, on Lightning: the LightningModule (`module`), the LightningCLI subclass
(`lightning_cli`), the run builder (`runs`), checkpoints, loggers and the callback that ends
every rank on one rank's error (`stop_all_ranks`).

Above `focaldet.inference` and below export, serve and the tools (see ``.importlinter``).
Importing this package imports nothing: each module is imported when used, so commands that
need no Lightning never load it.
"""
