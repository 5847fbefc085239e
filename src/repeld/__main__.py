"""`python -m repeld`."""

import sys

from .cli import main

sys.exit(main())
