"""`python -m repeld`."""

import sys

from repeld.cli import main

sys.exit(main())
