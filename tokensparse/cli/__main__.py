"""python -m tokensparse.cli: the `tokensparse` command."""

import sys

from tokensparse.cli import main

sys.exit(main())
