"""``python -m sim``: the robot fleet simulator (see :mod:`sim.cli`)."""

import sys

from sim.cli import main

sys.exit(main())
