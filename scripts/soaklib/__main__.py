import sys

from soaklib.cli import main

sys.exit(main())
