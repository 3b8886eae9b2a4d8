import sys

from wsviz.cli import main

sys.exit(main())
