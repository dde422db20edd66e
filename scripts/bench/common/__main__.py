"""``python -m common --phase NAME '<json arguments>'``: one measurement phase, in this process.

:func:`common.phases.run_phase` starts it in a fresh interpreter (see :mod:`common.phases`).
"""

import sys

from common.phases import child_main

sys.exit(child_main())
