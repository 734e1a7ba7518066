"""``python -m qru``: the same command as ``qru`` (also what ``torchrun -m qru`` runs)."""
import sys

from qru.cli import main

sys.exit(main())
