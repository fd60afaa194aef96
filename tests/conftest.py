import os
import sys

# Test helpers (dist_utils, models) live in tests/ and are imported by name, also in spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
