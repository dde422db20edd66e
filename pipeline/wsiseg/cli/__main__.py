"""``python -m wsiseg.cli``: the ``wsiseg`` command."""

import sys

from wsiseg.cli import main

sys.exit(main())
