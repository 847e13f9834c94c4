"""A persistent annotation cache shared safely by several processes (SQLite in WAL mode).

Every rank of a multi-GPU run, a resumed run and `trace-trl annotate` can point at the same `cache_dir`: SQLite's WAL
journal lets readers proceed while one writer commits, `timeout` makes writers wait for each other instead of
failing, and each batch is written with `INSERT OR REPLACE` in one transaction, so a crash never leaves half a batch.
A connection is opened per operation, so the cache object holds nothing but a path and pickles trivially.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..spans import Span
from .base import Annotation, AnnotationRequest


CACHE_FILENAME = "annotations.sqlite3"
_SCHEMA = "CREATE TABLE IF NOT EXISTS annotations (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"


def request_cache_key(config_fingerprint: str, request: AnnotationRequest) -> str:
    """SHA-256 of the annotator's configuration and the parts of the request the answer depends on.

    The reward and metadata are left out: two runs that agree on prompt, completion, correctness and privileged
    context get the same answer.
    """
    payload = json.dumps(
        {
            "config": config_fingerprint,
            "prompt": request.prompt,
            "completion": request.completion,
            "is_correct": bool(request.is_correct),
            "privileged_context": request.privileged_context,
        },
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def annotation_to_json(annotation: Annotation) -> str:
    return json.dumps(
        {
            "spans": [[span.start, span.end, span.kind] for span in annotation.spans],
            "diagnosis": annotation.diagnosis,
            "dropped_spans": annotation.dropped_spans,
            "usage": dict(annotation.usage),
        }
    )


def annotation_from_json(value: str) -> Annotation:
    data = json.loads(value)
    return Annotation(
        spans=tuple(Span(int(start), int(end), kind) for start, end, kind in data["spans"]),
        diagnosis=data.get("diagnosis"),
        dropped_spans=int(data.get("dropped_spans", 0)),
        usage=data.get("usage", {}),
    )


class AnnotationCache:
    """Annotations by key, in `<cache_dir>/annotations.sqlite3`.

    Args:
        cache_dir (`str` or `Path`):
            Folder of the cache; created if missing.
        timeout (`float`, *optional*, defaults to `60.0`):
            Seconds a process waits for another one's write lock before giving up.
    """

    def __init__(self, cache_dir: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(cache_dir) / CACHE_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._initialize()

    def _initialize(self) -> None:
        # Switching to WAL does not wait on the busy timeout: two processes creating the cache at the same moment get
        # "database is locked" at once. Retry until `timeout`.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with self._connect() as connection:
                    if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        connection.execute("PRAGMA journal_mode=WAL")
                    connection.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    def __repr__(self) -> str:
        return f"AnnotationCache(path={str(self.path)!r})"

    def _connect(self) -> _ClosingConnection:
        connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        return _ClosingConnection(connection)

    def get_many(self, keys: Sequence[str]) -> dict[str, Annotation]:
        """The cached annotations among `keys` (marked `usage["cached"] = 1`), keyed by key."""
        found: dict[str, Annotation] = {}
        unique = list(dict.fromkeys(keys))
        with self._connect() as connection:
            # Chunks stay below SQLite's limit on bound parameters.
            for i in range(0, len(unique), 500):
                chunk = unique[i : i + 500]
                rows = connection.execute(
                    f"SELECT key, value FROM annotations WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                for key, value in rows:
                    annotation = annotation_from_json(value)
                    found[key] = dataclasses.replace(annotation, usage={**annotation.usage, "cached": 1})
        return found

    def put_many(self, items: Iterable[tuple[str, Annotation]]) -> int:
        """Store successful annotations in one transaction; failures are skipped. Returns how many were written."""
        now = time.time()
        rows = [(key, annotation_to_json(annotation), now) for key, annotation in items if not annotation.failed]
        if not rows:
            return 0
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(
                    "INSERT OR REPLACE INTO annotations (key, value, created) VALUES (?, ?, ?)", rows
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return len(rows)

    def __len__(self) -> int:
        with self._connect() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])

    def stats(self) -> Mapping[str, Any]:
        return {"path": str(self.path), "entries": len(self)}


class _ClosingConnection:
    """`with` closes the connection (sqlite3's own context manager only ends the transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Connection:
        return self._connection

    def __exit__(self, *exc_info: object) -> None:
        self._connection.close()
