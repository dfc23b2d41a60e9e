"""Entry point for ``python -m repair_core``."""

import sys

from repair_core.cli import main

sys.exit(main())
