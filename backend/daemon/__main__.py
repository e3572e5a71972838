"""``python -m backend.daemon``: the daemon process (see backend.daemon.main)."""
import sys

from backend.daemon.main import main

sys.exit(main())
