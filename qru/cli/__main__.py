"""``python -m qru.cli``: the ``qru`` command."""
import sys

from qru.cli import main

sys.exit(main())
