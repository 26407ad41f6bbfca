"""``python -m lorakit``: the ``lorakit`` command line, also as torchrun's entry point
(``torchrun --nproc-per-node 2 -m lorakit train RECIPE``)."""

import sys

from lorakit.cli import main

sys.exit(main())
