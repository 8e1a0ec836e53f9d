import sys

from moequant.cli.main import main

sys.exit(main())
