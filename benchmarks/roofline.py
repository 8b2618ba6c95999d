"""Roofline of the student's training step by part of the model; the same as ``itpn-roofline``."""

import sys

from itpn.cli.roofline import main

if __name__ == "__main__":
    sys.exit(main())
