"""``python -m hwdiff.cli``: the same command line as ``python -m hwdiff`` and ``hwdiff``."""

import sys

from . import main

sys.exit(main())
