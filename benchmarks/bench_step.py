"""Training-step / inference benchmark; the same as the ``itpn-bench`` command."""

import sys

from itpn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
