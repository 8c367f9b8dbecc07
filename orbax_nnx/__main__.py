"""`python -m orbax_nnx ...` runs the `orbax-nnx` command line."""

from orbax_nnx.cli import run

run()
