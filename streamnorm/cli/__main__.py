"""``python -m streamnorm.cli``."""

import sys

from . import main

sys.exit(main())
