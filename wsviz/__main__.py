import sys

from wsviz.cli import main
from wsviz.cli_errors import run_cli

sys.exit(run_cli(main))
