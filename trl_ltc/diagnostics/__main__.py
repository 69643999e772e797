"""`python -m trl_ltc.diagnostics`: the same as `trl-ltc diagnose`."""

import sys

from ..commands.diagnose import main

sys.exit(main())
