"""The client package is imported from client/ (its own distribution, not installed as part
of the broker)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[3] / "client"))
