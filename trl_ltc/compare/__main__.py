"""`python -m trl_ltc.compare`: the same as `trl-ltc compare`."""

import sys

from ..commands.compare import main

sys.exit(main())
