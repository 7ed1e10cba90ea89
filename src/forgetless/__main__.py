"""``python -m forgetless``: the same command line as the ``forgetless`` script."""

import sys

from forgetless.cli import main

sys.exit(main())
