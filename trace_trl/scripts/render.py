"""`trace-trl render`: annotations (the JSONL of `trace-trl annotate`) as one self-contained HTML page.

```bash
trace-trl render annotations.jsonl -o annotations.html --tokenizer Qwen/Qwen3-1.7B
```

Inline CSS and no external assets, key and error spans highlighted, per-run statistics on top; in Jupyter,
[`~trace_trl.inspection.AnnotationView`] shows the same page.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trace_trl.inspection import read_jsonl, render_annotations_html


def main(argv: Sequence[str] | None = None) -> int:
    """`trace-trl render`: annotations JSONL to a self-contained HTML page."""
    parser = argparse.ArgumentParser(
        prog="trace-trl render", description="Render annotations as a self-contained HTML page."
    )
    parser.add_argument("annotations", help="JSONL written by `trace-trl annotate`")
    parser.add_argument("-o", "--output", default=None, help="HTML file (default: the input with .html)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or Hub id, adds the routed-token fraction")
    parser.add_argument("--title", default=None)
    parser.add_argument("--max-rows", type=int, default=None, help="rollouts shown (statistics cover all)")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.annotations)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    output = Path(args.output or Path(args.annotations).with_suffix(".html"))
    page = render_annotations_html(
        rows,
        title=args.title or f"TRACE annotations: {Path(args.annotations).name}",
        tokenizer=tokenizer,
        max_rows=args.max_rows,
    )
    output.write_text(page, encoding="utf-8")
    print(f"Wrote {output} ({len(rows)} rollouts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
