"""Annotations per second of `OpenAIAnnotator` against its concurrency, on a local fake server with fixed latency.

    python benchmarks/annotator_throughput.py --latency 0.2 --rollouts 64

The server (tests/fake_openai_server.py) is a real HTTP server on 127.0.0.1 that answers every request after
`--latency` seconds, so the numbers measure the annotator's own overhead and its concurrency, not a model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from trace_trl.annotators import AnnotationRequest, OpenAIAnnotator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()

    requests = [
        AnnotationRequest(
            f"Problem {i}: what is {i} + {i}?", f"We add: {i} + {i} = {2 * i}.\nAnswer: {2 * i}.", i % 2 == 0, 1.0
        )
        for i in range(args.rollouts)
    ]
    print(f"{args.rollouts} rollouts, server latency {args.latency * 1000:.0f} ms per request")
    print(f"| {'concurrency':>11} | {'wall s':>7} | {'annotations/s':>13} | {'speed-up':>8} | {'ideal':>6} |")
    print(f"|{'-' * 13}|{'-' * 9}|{'-' * 15}|{'-' * 10}|{'-' * 8}|")
    baseline = None
    with FakeOpenAIServer(latency=args.latency) as server:
        for concurrency in args.concurrency:
            annotator = OpenAIAnnotator(
                "fake", base_url=server.base_url, api_key="sk-bench", max_concurrency=concurrency, span_format="quotes"
            )
            started = time.perf_counter()
            annotations = annotator(requests)
            wall = time.perf_counter() - started
            assert not any(a.failed for a in annotations), [a.error for a in annotations if a.failed][:3]
            rate = len(requests) / wall
            baseline = baseline or rate
            ideal = min(concurrency, args.rollouts) / args.concurrency[0]
            print(f"| {concurrency:>11} | {wall:>7.2f} | {rate:>13.1f} | {rate / baseline:>7.1f}x | {ideal:>5.0f}x |")


if __name__ == "__main__":
    main()
