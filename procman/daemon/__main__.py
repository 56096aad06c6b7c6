"""``python -m procman.daemon``: how clients launch the daemon (no CLI dependencies)."""

import sys

from procman.daemon.service import main

sys.exit(main())
