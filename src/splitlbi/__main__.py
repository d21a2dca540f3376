"""``python -m splitlbi``: the same as the ``splitlbi`` command."""

import sys

from splitlbi.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
