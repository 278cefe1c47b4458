"""`python -m cryptsnap` is the `cryptsnap` command."""

import sys

from .cli import main

sys.exit(main())
