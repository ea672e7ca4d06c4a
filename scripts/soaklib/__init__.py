"""The chaos soak (docs/soak.md): one served disk, real clients, a seeded schedule of
operations and faults, invariants after every step.

The harness reuses the test suite's helpers (tests/conftest.py's Server and make_image,
tests/faults.py's FaultSwitch and error_args, tests/netrig.py's TLS servers and network
namespace, tests/qmp_fuzz.py's messages), so tests/ and the repository root (for jobctl's
QMP client) go on sys.path here.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (REPO, os.path.join(REPO, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
