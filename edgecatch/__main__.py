"""`python -m edgecatch` is the `edgecatch` command."""

import sys

from edgecatch.cli import main

sys.exit(main())
