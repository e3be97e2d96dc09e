import sys

from speclora.cli import console

sys.exit(console())
