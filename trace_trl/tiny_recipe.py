"""Deprecated path: `trace_trl.tiny_recipe` moved to `trace_trl.scripts.tiny_recipe` in 0.2 (this alias goes in 0.3)."""

from trace_trl._deprecation import moved_module


_module = moved_module("trace_trl.tiny_recipe", "trace_trl.scripts.tiny_recipe")
