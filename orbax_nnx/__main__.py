"""`python -m orbax_nnx ...` runs the `orbax-nnx` command line."""

import sys

from orbax_nnx.cli import main

sys.exit(main())
