"""`python -m moequant ...` runs the command line, as `moequant ...` does."""

import sys

from moequant.cli.main import main

sys.exit(main())
