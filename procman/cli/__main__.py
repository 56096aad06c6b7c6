import sys

from procman.cli import main

sys.exit(main())
