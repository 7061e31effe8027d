"""`torchrun --nproc-per-node N -m flexserve.parallel.generate ...`: see `flexserve.parallel.launch`."""
from __future__ import annotations

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
