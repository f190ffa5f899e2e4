"""
A process that does not use a feature does not load it (issue 19: RSS).
Checked in a fresh interpreter, since this one has loaded everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

_PROBE = """
import json, sys
from mtasts_twisted.service import Options, makeService
options = Options()
options.parseOptions(sys.argv[1:])
makeService(options)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("treq", "hyperlink")
                        or m.startswith(("mtasts_twisted.web", "twisted.web.template", "twisted.web.server")))))
"""


class LazyImportTests(TestCase):
    def loaded(self, *argv: str) -> list[str]:
        data = os.path.abspath(self.mktemp())
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, "--data-dir", data, "--nameserver", "127.0.0.1:53",
             "--socketmap", "tcp:0:interface=127.0.0.1", "--smtp", "none", *argv],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        return json.loads(out.stdout.splitlines()[-1])

    def test_socketmap_only(self) -> None:
        """Without --web and reports, no status page modules and no treq."""
        self.assertEqual(self.loaded("--no-reports"), [])

    def test_web_loads_them(self) -> None:
        """The probe sees them when the feature is on (so the test above can fail)."""
        loaded = self.loaded("--no-reports", "--web", "tcp:0:interface=127.0.0.1")
        self.assertIn("mtasts_twisted.web", loaded)
