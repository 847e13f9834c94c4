"""Deprecated path: `trace_trl.train` moved to `trace_trl.scripts.train` in 0.2 (this alias goes in 0.3)."""

import sys

from trace_trl._deprecation import moved_module


_module = moved_module("trace_trl.train", "trace_trl.scripts.train")

if __name__ == "__main__":  # `accelerate launch -m trace_trl.train <recipe>`, the 0.1 spelling
    sys.exit(_module.main())
