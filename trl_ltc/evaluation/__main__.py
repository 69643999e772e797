"""`python -m trl_ltc.evaluation`: the same as `trl-ltc evaluate`."""

import sys

from ..commands.evaluate import main

sys.exit(main())
