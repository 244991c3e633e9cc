#!/usr/bin/env python
"""Run ``focaldet bench`` from a checkout: ``python scripts/bench.py --quick``.

Same as ``focaldet bench ...`` / ``python -m focaldet.bench ...``; see docs/benchmarks.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focaldet.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
