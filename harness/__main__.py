"""``python -m harness matrix|diff|bisect-step|releases`` (see :mod:`harness.cli.main`)."""

import sys

from harness.cli.main import main

sys.exit(main())
