"""A job's output, written so that a job killed at any moment (Ctrl-C, kill -9) and started again with the
same command skips what is done and loses nothing.

JSONL output is the journal itself: each row is one `write` of one whole line to a file opened for appending,
and a restart first cuts a torn last line (a kill inside the write) and reads back the (image, task) pairs
done. Parquet cannot be appended to, so rows go to the journal `OUT.parquet.partial.jsonl` and the Parquet
file is written from it atomically at the end (a rerun also skips what an existing Parquet file holds)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import SettingsError

Row = dict[str, Any]  # {"image", "task", "result"} or {"image", "task", "error": {"type", "message"}}


class Journal:
    def __init__(self, output: str | Path):
        self.output = Path(output)
        suffix = self.output.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise SettingsError(f"output {self.output} must end in .jsonl or .parquet")
        self.parquet = suffix == ".parquet"
        self.path = self.output.with_name(self.output.name + ".partial.jsonl") if self.parquet else self.output
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[tuple[str, str]] = set()
        self._previous: list[Row] = _read_parquet(self.output) if self.parquet and self.output.exists() else []
        self.done |= {(r["image"], r["task"]) for r in self._previous}
        self.done |= {(r["image"], r["task"]) for r in self._recover()}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def _recover(self) -> list[Row]:
        """The rows already written, after cutting a torn last line."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
        return [json.loads(line) for line in keep.splitlines() if line.strip()]

    def write(self, row: Row) -> None:
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)  # one write of the whole line: a kill leaves it whole or torn at the end
            self.done.add((row["image"], row["task"]))

    def close(self) -> None:
        """Close the journal; for Parquet output, write the Parquet file (every row so far) and drop the journal."""
        os.fsync(self._fd)
        os.close(self._fd)
        if not self.parquet:
            return
        rows = self._previous + self._recover()
        _write_parquet(rows, self.output)
        self.path.unlink()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_parquet(rows: list[Row], target: Path) -> None:
    """Columns image, task, result and error; result and error as JSON text (their shape depends on the task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [r["image"] for r in rows],
            "task": [r["task"] for r in rows],
            "result": [json.dumps(r["result"]) if "result" in r else None for r in rows],
            "error": [json.dumps(r["error"]) if "error" in r else None for r in rows],
        }
    )
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    rows = []
    for r in pq.read_table(path).to_pylist():
        row = {"image": r["image"], "task": r["task"]}
        row |= {"result": json.loads(r["result"])} if r.get("result") is not None else {}
        row |= {"error": json.loads(r["error"])} if r.get("error") is not None else {}
        rows.append(row)
    return rows
