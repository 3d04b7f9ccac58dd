import sys

from minilm.cli import entry

sys.exit(entry())
