"""``python -m tinyclip`` runs the same command line as the ``tinyclip`` script."""

import sys

from .cli import main

sys.exit(main())
