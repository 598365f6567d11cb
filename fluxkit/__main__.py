"""`python -m fluxkit ...` is the `fluxkit` command (also what `torchrun -m fluxkit train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
