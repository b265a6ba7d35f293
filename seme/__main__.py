import sys

from seme.cli import run

sys.exit(run())
