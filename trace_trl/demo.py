"""Deprecated path: `trace_trl.demo` moved to `trace_trl.scripts.demo` in 0.2 (this alias goes in 0.3)."""

import sys

from trace_trl._deprecation import moved_module


_module = moved_module("trace_trl.demo", "trace_trl.scripts.demo")

if __name__ == "__main__":
    sys.exit(_module.main())
