"""`python -m patching`: the same as the patch-run executable."""
import sys

from patching.painter import program

sys.exit(program())
