"""``python -m focaldet.bench ...``: the same as ``focaldet bench ...``."""

import sys

from focaldet.bench import main

sys.exit(main())
