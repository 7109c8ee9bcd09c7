"""`python -m clusterfit ...` (how torchrun starts each rank)."""

import sys

from clusterfit.cli import main

sys.exit(main())
