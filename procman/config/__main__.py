"""``python -m procman.config --reference``: the config reference, generated."""

import sys

from procman.config import main

sys.exit(main(sys.argv[1:]))
