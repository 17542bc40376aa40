"""Let the tests run from a checkout without installing the plugin first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
