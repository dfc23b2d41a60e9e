"""Entry point for ``python -m repair_core``."""

import sys

try:
    from repair_core.cli import main
except KeyboardInterrupt:
    # Importing torch can take a second or more, long enough for a Ctrl-C.
    print("Interrupted.", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
