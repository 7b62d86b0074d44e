"""``python -m dvfl COMMAND ...``: the ``dvfl`` console script without installing it."""
import sys

from dvfl.cli import main

if __name__ == "__main__":
    sys.exit(main())
