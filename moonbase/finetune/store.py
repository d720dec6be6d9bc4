"""Finetunes on disk. Every file is written atomically (temporary file, fsync, rename, fsync of the
directory: `moonbase/atomic.py`), so a crash at any moment leaves each file either old or new, never torn.

    ROOT/<finetune_id>/meta.json               id (ULID), name, rank, base model, LoRA options, times, deleted
                       state.pt                trainer state after the last applied step (adapter, optimizer,
                                               step, recent idempotency keys with their responses)
                       checkpoints/<step>.pt   the adapter at that step (variant layout, `lora_state_dict`)
                       checkpoints/<step>.json its CheckpointInfo, written after the .pt: a checkpoint exists
                                               once its .json does, so a crash between the two leaves an
                                               orphan .pt that is ignored (and overwritten by the next save)
                       metrics.json            {step: {name: value}}, user metrics and every applied step's
                       .lock                   the finetune's advisory lock (`FinetuneStore.lock`); ROOT/.lock is
                                               the store's (names, create and delete)

Deleting keeps meta.json as a tombstone (a repeated DELETE is still 200) and removes the rest.

Several processes may share one ROOT (server replicas, the CLI next to a server): every read-modify-write of a
finetune runs under its `lock`, and a process caching a loaded state asks `state_is` (see service.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..atomic import atomic_path, write_text_atomic
from ..errors import FinetuneConflictError, FinetuneNotFoundError, TuningError

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CHECKPOINT = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}@\d+")  # <finetune_id (a ULID)>@<step>


def split_checkpoint(model: str) -> tuple[str, str | None]:
    """`<base>/<finetune_id>@<step>` -> (base, "<finetune_id>@<step>"); any other name -> (name, None)."""
    base, _, last = model.rpartition("/")
    return (base, last) if base and CHECKPOINT.fullmatch(last) else (model, None)


crash_at: str | None = None  # tests: SIGKILL this process at the named write point (see `_point`)


_last_ulid = [0]  # monotonic within a process: ids created in the same millisecond still sort by creation
_ulid_lock = threading.Lock()


def new_ulid(now_ms: int | None = None) -> str:
    """26 characters of Crockford base32: 48 bits of milliseconds, then 80 random bits (sortable by time)."""
    value = ((now_ms if now_ms is not None else int(time.time() * 1000)) << 80) | secrets.randbits(80)
    with _ulid_lock:
        value = _last_ulid[0] = max(value, _last_ulid[0] + 1)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def now_ms() -> int:
    return int(time.time() * 1000)


def _point(name: str) -> None:
    """A named moment between writes; a test sets `crash_at` to kill the process exactly there."""
    if crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class FinetuneInfo:
    finetune_id: str
    name: str
    rank: int
    base_model: str
    lora: dict[str, Any]
    created_at_ms: int
    updated_at_ms: int
    deleted: bool = False

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("finetune_id", "name", "rank", "created_at_ms", "updated_at_ms", "base_model")}


class FinetuneStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._held = threading.local()  # the lock files this thread holds: `lock` is re-entrant

    @contextmanager
    def lock(self, fid: str | None = None) -> Iterator[None]:
        """Exclusive across threads and processes sharing ROOT: one finetune's lock, or without an id the
        store's (names are unique among live finetunes). `fcntl.flock` on a `.lock` file, so POSIX only
        (and a local filesystem); each call opens the file anew, and flock excludes other open files of it
        in this process too. The OS releases it when its holder dies, so a killed server blocks no one."""
        path = (self.root if fid is None else self._dir(fid)) / ".lock"
        held = self._held.__dict__.setdefault("paths", set())
        if path in held:
            yield
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            raise FinetuneNotFoundError(f"no finetune {fid!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(path)
            yield
        finally:
            held.discard(path)
            os.close(fd)  # and with it the lock

    # --- finetunes ----------------------------------------------------------------------------------

    def _dir(self, fid: str) -> Path:
        if not fid or len(fid) != 26 or any(c not in _CROCKFORD for c in fid):
            raise FinetuneNotFoundError(f"no finetune {fid!r}")
        return self.root / fid

    def _write_json(self, path: Path, value: Any) -> None:
        write_text_atomic(path, json.dumps(value, indent=1))

    def get(self, fid: str, deleted_ok: bool = False) -> FinetuneInfo:
        path = self._dir(fid) / "meta.json"
        if not path.is_file():
            raise FinetuneNotFoundError(f"no finetune {fid!r}")
        info = FinetuneInfo(**json.loads(path.read_text()))
        if info.deleted and not deleted_ok:
            raise FinetuneNotFoundError(f"finetune {fid!r} was deleted")
        return info

    def list(self) -> list[FinetuneInfo]:
        """Live finetunes, oldest first (ULIDs sort by creation time)."""
        metas = [d / "meta.json" for d in sorted(self.root.iterdir())]
        infos = [FinetuneInfo(**json.loads(p.read_text())) for p in metas if p.is_file()]
        return [info for info in infos if not info.deleted]

    def create(self, name: str, rank: int, base_model: str, lora: dict[str, Any]) -> tuple[FinetuneInfo, bool]:
        """(info, created). The same name and rank returns the existing finetune; another rank is a conflict."""
        with self.lock():
            for info in self.list():
                if info.name == name:
                    if info.rank != rank:
                        raise FinetuneConflictError(f"finetune {name!r} exists with rank {info.rank}, not {rank}")
                    return info, False
            t = now_ms()
            info = FinetuneInfo(new_ulid(t), name, rank, base_model, lora, t, t)
            d = self.root / info.finetune_id
            (d / "checkpoints").mkdir(parents=True)
            self._write_json(d / "meta.json", asdict(info))
            return info, True

    def delete(self, fid: str) -> None:
        """Tombstone the finetune (meta.json stays, `deleted`), then remove its state and checkpoints."""
        with self.lock(), self.lock(fid):  # a step training in another process finishes first, or sees the tombstone
            info, d = self.get(fid, deleted_ok=True), self._dir(fid)
            if not info.deleted:
                info.deleted, info.updated_at_ms = True, now_ms()
                self._write_json(d / "meta.json", asdict(info))
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            for name in ("state.pt", "metrics.json"):
                (d / name).unlink(missing_ok=True)

    # --- training state -----------------------------------------------------------------------------

    def state_file(self, fid: str) -> BinaryIO | None:
        """state.pt opened for reading (None without one); kept open, it names the state a process holds."""
        try:
            return open(self._dir(fid) / "state.pt", "rb")
        except FileNotFoundError:
            return None

    def load_state(self, fid: str, file: BinaryIO | None = None) -> dict[str, Any] | None:
        """The state in `file` (from `state_file`), else in state.pt; None without one."""
        path = self._dir(fid) / "state.pt"
        if file is None and not path.is_file():
            return None
        return torch.load(file or path, map_location="cpu", weights_only=True)

    def state_is(self, fid: str, file: BinaryIO | None) -> bool:
        """Whether state.pt is still `file` (None: still absent). Every save renames a new file over it, so a
        replaced state has another inode; and while `file` stays open its inode cannot be reused, which a
        recorded (inode, mtime, size) could not rule out (mtimes are coarse, freed inodes get reused)."""
        try:
            now = os.stat(self._dir(fid) / "state.pt")
        except FileNotFoundError:
            return file is None
        return file is not None and os.path.samestat(now, os.fstat(file.fileno()))

    def save_state(self, fid: str, state: dict[str, Any]) -> None:
        with atomic_path(self._dir(fid) / "state.pt") as tmp:
            torch.save(state, tmp)
            _point("state:written")

    # --- checkpoints --------------------------------------------------------------------------------

    def _ckpt(self, fid: str, step: int, suffix: str) -> Path:
        return self._dir(fid) / "checkpoints" / f"{step:09d}.{suffix}"

    def save_checkpoint(self, fid: str, step: int, payload: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint at `step`; an existing one is returned as is (saving is keyed by step)."""
        with self.lock(fid):
            info = self.get(fid)
            existing = self._ckpt(fid, step, "json")
            if existing.is_file():
                record = json.loads(existing.read_text())
                if not record.get("deleted"):
                    return record
            with atomic_path(self._ckpt(fid, step, "pt")) as tmp:
                torch.save(payload | {"finetune_id": fid, "base_model": info.base_model}, tmp)
                _point("checkpoint:tensors-written")
            _point("checkpoint:between-files")
            t = now_ms()
            record = {"checkpoint_id": f"{fid}@{step}", "finetune_id": fid, "step": step, "expires_at_ms": None}
            record |= {"created_at_ms": t, "updated_at_ms": t}
            self._write_json(existing, record)
            return record

    def checkpoints(self, fid: str) -> list[dict[str, Any]]:
        """Saved checkpoints, by step."""
        self.get(fid)
        saved = [p for p in sorted((self._dir(fid) / "checkpoints").glob("*.json")) if p.with_suffix(".pt").is_file()]
        return [r for r in (json.loads(p.read_text()) for p in saved) if not r.get("deleted")]

    def checkpoint_path(self, fid: str, step: int) -> Path:
        self.get(fid)
        meta, path = self._ckpt(fid, step, "json"), self._ckpt(fid, step, "pt")
        if not meta.is_file() or json.loads(meta.read_text()).get("deleted") or not path.is_file():
            raise FinetuneNotFoundError(f"finetune {fid} has no checkpoint at step {step}")
        return path

    def load_checkpoint(self, fid: str, step: int) -> dict[str, Any]:
        return torch.load(self.checkpoint_path(fid, step), map_location="cpu", weights_only=True)

    def delete_checkpoint(self, fid: str, step: int) -> None:
        """Tombstone then remove; deleting a deleted checkpoint is fine, one never saved is not found."""
        with self.lock(fid):
            self.get(fid)
            meta = self._ckpt(fid, step, "json")
            if not meta.is_file():
                raise FinetuneNotFoundError(f"finetune {fid} has no checkpoint at step {step}")
            record = json.loads(meta.read_text())
            if not record.get("deleted"):
                self._write_json(meta, record | {"deleted": True, "updated_at_ms": now_ms()})
            self._ckpt(fid, step, "pt").unlink(missing_ok=True)

    # --- metrics ------------------------------------------------------------------------------------

    def metrics(self, fid: str) -> dict[str, dict[str, float]]:
        path = self._dir(fid) / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def log_metrics(self, fid: str, step: int, values: dict[str, Any]) -> int:
        """Upsert by (step, name); returns how many were logged."""
        with self.lock(fid):  # a read-modify-write: another process's log must not be lost
            self.get(fid)
            for k, v in values.items():
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, type(None))):
                    raise TuningError(f"metric {k!r} must be a number, got {v!r}")
            table = self.metrics(fid)
            table.setdefault(str(step), {}).update(values)
            self._write_json(self._dir(fid) / "metrics.json", table)
        return len(values)
