"""`python -m sparseft` runs the command line."""

import sys

from sparseft.cli import main

sys.exit(main())
