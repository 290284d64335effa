"""``python -m detrkit ...``: the same as the ``detrkit`` command."""

import sys

from detrkit.cli import main

sys.exit(main())
