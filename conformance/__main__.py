"""``python -m conformance [pytest options]``: conformance/command.py."""

import sys

from .command import main

sys.exit(main())
