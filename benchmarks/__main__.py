"""`python -m benchmarks`: run the side-by-side benchmark and write its report."""

from __future__ import annotations

import sys

from benchmarks.cli import main

sys.exit(main())
