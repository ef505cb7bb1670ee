"""`python -m patching`: the same as the patch-run executable."""
import sys

from patching.main import program

sys.exit(program())
