"""``python -m defectml``."""

import sys

from defectml.cli import main

sys.exit(main())
