"""The command-line entry points of `trace-trl <command>`, one module per command (as TRL keeps `trl/scripts/`).

- `train`: train from a YAML recipe with command-line overrides (`tiny_recipe`: its `--tiny` offline rewrite);
- `eval`: avg@k on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond;
- `annotate`: run an annotator over rollouts; `render`: annotations as an HTML page;
- `demo`: GRPO and TRACE side by side on CPU.

Each module has a `main(argv) -> int`; `trace_trl/cli.py` dispatches to them. The library they use (trainer, config,
annotators, data, rewards, evaluation) lives at the top of `trace_trl/`.
"""
