"""The leaves every layer reads: how evaluation and inference prepare an image (`inputs`: the
one resize rule, `InputSettings`), recipes as ``class_path`` trees (`recipe`), and what a file
from a stranger may make focaldet do (`safe_load`: the weights-only loader and the allow-list).

Below data, modeling and losses (see ``.importlinter``); importing this package imports nothing.
"""
