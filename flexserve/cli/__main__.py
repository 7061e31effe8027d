"""`python -m flexserve.cli ...` (and `torchrun ... -m flexserve.cli serve ...`): the `flexserve` command."""
import sys

from . import main

sys.exit(main())
