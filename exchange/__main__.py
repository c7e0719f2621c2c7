"""``python -m exchange`` is the ``exchange`` command."""

import sys

from exchange.cli.main import main

sys.exit(main())
