"""``python -m data_prep ...``: the same as the ``itpn-prep`` command."""

import sys

from .cli import main

sys.exit(main())
