"""What a batch job reads: a folder or glob of images, a text file of paths, a JSONL of requests, a Parquet
file with an image column. Each becomes a stream of `Item`s: a stable key (what output rows call `image`, and
what a resumed job skips by), the image's source, and the item's own requests (JSONL rows that name a skill)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..skills import SkillRequest, parse_request

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "image_path", "path", "file_name")  # tried in order when --image-column is not given


@dataclass(frozen=True)
class Item:
    key: str
    source: Any  # a path, encoded bytes, or an error to report for every task of the item
    requests: tuple[SkillRequest, ...] = ()  # the item's own tasks (JSONL rows); none: the job's tasks apply


def read_inputs(spec: str | Path, image_column: str | None = None) -> Iterator[Item]:
    """Items in input order. A folder is walked recursively (image suffixes only, sorted); a pattern with
    `*`, `?` or `[` is a glob; `.txt` lists one path per line and `.jsonl` one request per line (paths relative
    to the list's folder); `.parquet` reads an image column of paths or encoded bytes."""
    text = str(spec)
    path = Path(text)
    if any(c in text for c in "*?[") and not path.exists():
        files = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if p.is_file())
        return (Item(str(p), p) for p in files)
    if path.is_dir():
        return (Item(str(p), p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not path.is_file():
        raise SettingsError(f"no such input: {text} (a folder, a glob, a .txt, .jsonl or .parquet file, or an image)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _listed(path)
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".parquet":
        return _parquet(path, image_column)
    return iter([Item(text, path)])  # one image


def count_inputs(spec: str | Path, image_column: str | None = None) -> int:
    """How many items `read_inputs` yields (a Parquet file's row count from its metadata, without reading it)."""
    if str(spec).lower().endswith(".parquet") and Path(spec).is_file():
        import pyarrow.parquet as pq

        return pq.ParquetFile(spec).metadata.num_rows
    return sum(1 for _ in read_inputs(spec, image_column))


def _listed(path: Path) -> Iterator[Item]:
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield Item(line.strip(), path.parent / line.strip())


def _jsonl(path: Path) -> Iterator[Item]:
    """`{"image": ..., "skill": ..., "question"|"object"|"length": ..., "settings": {...}}` per line; a row with
    only `image` takes the job's tasks. A bad row becomes an item whose source is the error (it gets an error
    row; the job goes on)."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    raise SettingsError(f"{where}: each line must be an object with an `image` path")
                image = row["image"]
                request = parse_request(row, lambda v: str(path.parent / v), where=where) if "skill" in row else None
            except json.JSONDecodeError as e:
                yield Item(where, SettingsError(f"{where}: not JSON ({e.msg})"))
                continue
            except SettingsError as e:
                yield Item(where, e)
                continue
            yield Item(image, path.parent / image, () if request is None else (request,))


def _parquet(path: Path, column: str | None) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SettingsError("reading Parquet needs pyarrow: pip install pyarrow") from e
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    column = column or next((c for c in IMAGE_COLUMNS if c in names), None)
    if column not in names:
        raise SettingsError(f"{path}: no image column (looked for {column or ', '.join(IMAGE_COLUMNS)}; has {', '.join(names)})")
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=256):
        for value in batch.column(0).to_pylist():
            yield _parquet_item(path, row, value)
            row += 1


def _parquet_item(path: Path, row: int, value: Any) -> Item:
    """A path (relative to the file's folder), encoded bytes, or a Hugging Face image struct {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return Item(value, path.parent / value)
    if isinstance(value, (bytes, bytearray)):
        return Item(f"{path.name}#{row}", bytes(value))
    return Item(f"{path.name}#{row}", SettingsError(f"{path} row {row}: the image cell is empty or not a path or bytes"))
