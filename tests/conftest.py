import os
import sys

# Test helpers (dist_utils, models) live in tests/ and are imported by name, also in spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Plans on the "local" preset read this host's op profile (autopar profile); tests never see a
# developer's cache, only the ones they make themselves.
if "AUTOPAR_TEST_KEEP_CACHE" not in os.environ:
    import tempfile

    os.environ["AUTOPAR_CACHE_DIR"] = tempfile.mkdtemp(prefix="autopar-test-cache-")
