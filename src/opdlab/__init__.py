"""opdlab: on-policy distillation, and what it does to a model's parameters."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Commands that stream tensor pairs allocate and free many 4-35 MB buffers per tensor; each fresh
# buffer costs a page fault per 4 KB page (measured: a quarter of `analyze`'s CPU time, in the
# kernel). torch backs large allocations with 2 MB huge pages when THP_MEM_ALLOC_ENABLE is set
# before torch loads — hence here, keyed on the command line. The user's own setting wins.
if len(_sys.argv) > 1 and _sys.argv[1] in ("analyze", "compare", "mask") and "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
