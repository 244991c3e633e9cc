import sys

from focaldet.cli import main

sys.exit(main())
