"""Allow `python -m jobctl ...`."""

import sys

from jobctl.cli import main

sys.exit(main())
