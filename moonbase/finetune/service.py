"""The tuning service: finetunes, rollouts, train steps, metrics and checkpoints over one served model. The
HTTP layer (`server/tuning.py`) and the CLI call it; it holds every piece of state.

Train steps of one finetune run one at a time; identical steps sent one after another are all applied (a small
dataset repeats its batch every epoch). A step with an idempotency key is applied once: the last `KEPT_KEYS` keys
and their responses are saved in the same atomic write as the trained state. A duplicate arriving while its twin
runs (same key, or the same body without one) gets the twin's result. The window left: docs/finetuning.md.

Several processes may serve one finetune directory. Every change to a finetune holds its `FinetuneStore.lock`
(an OS file lock: it excludes other threads too), and a cached session is used only while state.pt is still
the file it was loaded from or saved as; otherwise the session (trainer state and keys together) is loaded
again, so no step is lost and a key is applied once.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, BinaryIO

from ..api import VL
from ..errors import FinetuneConflictError, FinetuneNotFoundError, IdempotencyKeyReusedError, TuningError
from ..image import load_image
from ..model.lora import TARGETS, Adapter, adapter_from_state_dict
from .lora import RANKS, LoraConfig
from .rollouts import sample_rollouts
from .steps import Limits, body_digest, finetune_id_of, int_of, parse_step
from .store import FinetuneStore
from .trainer import StepConfig, Trainer, adapter_from_checkpoint
from .types import parse_target, parse_tuning_request

NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
KEPT_KEYS = 1000


class Session:
    """A loaded finetune: its trainer, the frozen adapter rollouts sample from, its recent keys, and the
    state.pt they match, held open (`FinetuneStore.state_is`: has another process replaced it since?)."""

    def __init__(self, fid: str, trainer: Trainer, responses: dict[str, Any], file: BinaryIO | None):
        self.fid, self.trainer, self.file = fid, trainer, file
        self.refresh()
        self.responses: OrderedDict[str, Any] = OrderedDict(responses)

    def refresh(self) -> None:
        """Rollouts sample from a frozen copy of the current policy, swapped in whole after each step."""
        step = self.trainer.step
        self.policy = (step, self.trainer.adapter(f"{self.fid}@live{step}"))  # a new name: no stale cached prefixes


class TuningService:
    def __init__(
        self,
        vl: VL,
        store: FinetuneStore,
        base_name: str,
        image_of: Callable[[Any], Any] | None = None,
        step_cfg: StepConfig = StepConfig(),
        limits: Limits = Limits(),
        cached_sessions: int = 4,
        timeout: float | None = None,  # seconds per rollouts request (default: the VL's)
    ):
        self.vl, self.store, self.base_name, self.step_cfg, self.limits = vl, store, base_name, step_cfg, limits
        self.timeout, self.cached_sessions = timeout, cached_sessions
        self.image_of = image_of or (lambda v: load_image(v, vl.limits.max_pixels))
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future] = {}
        vl.engine.adapters.add_source(self.resolve)  # `<finetune_id>@<step>` serves that checkpoint

    # --- finetunes ----------------------------------------------------------------------------------

    def create(self, name: Any, rank: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        if not isinstance(name, str) or not NAME.match(name):
            raise TuningError("name must be 1-128 characters of letters, digits, '.', '-' and '_'")
        if rank not in RANKS or isinstance(rank, bool):
            raise TuningError(f"rank must be one of {', '.join(map(str, RANKS))}, got {rank!r}")
        o = options or {}
        try:
            flags = {k: bool(o.get(k)) for k in ("train_region", "train_vision")}
            cfg = LoraConfig(rank, o.get("alpha"), tuple(o.get("targets") or TARGETS), **flags).validate()
        except (TypeError, ValueError) as e:
            raise TuningError(str(e)) from e
        info, created = self.store.create(name, rank, self.base_name, cfg.to_dict())
        fid = info.finetune_id
        if created:
            with self.store.lock(fid):  # another process may have found it by name and trained it already
                if self.store.state_is(fid, None):
                    self.store.save_state(fid, self._new_trainer(fid, cfg).state_dict() | {"responses": {}})
        return info.public()

    def get(self, fid: str) -> dict[str, Any]:
        return self.store.get(fid).public() | {"step": self.session(fid).trainer.step}

    def list(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        items = [f for f in self.store.list() if cursor is None or f.finetune_id > cursor]
        page, more = items[:limit], len(items) > limit
        return {"finetunes": [f.public() for f in page], "next_cursor": page[-1].finetune_id if more else None, "has_more": more}

    def delete(self, fid: str) -> None:
        self.store.delete(fid)
        with self._lock:
            self._sessions.pop(fid, None)

    def import_adapter(self, name: str, variant: dict[str, Any], cfg: LoraConfig) -> str:
        """A new finetune whose adapter is `variant` (scale folded into B), saved as its step-0 checkpoint."""
        adapter_from_state_dict(name, variant, self.vl.model.cfg.text)  # the shapes must fit this model
        info, created = self.store.create(name, cfg.rank, self.base_name, cfg.to_dict())
        if not created:
            raise FinetuneConflictError(f"a finetune named {name!r} exists")
        trainer = self._new_trainer(info.finetune_id, cfg)
        trainer.lora.load_variant_state(variant)
        self.store.save_state(info.finetune_id, trainer.state_dict() | {"responses": {}})
        self.save_checkpoint(info.finetune_id)
        return info.finetune_id

    def _new_trainer(self, fid: str, cfg: LoraConfig) -> Trainer:
        seed = int(hashlib.blake2b(fid.encode(), digest_size=4).hexdigest(), 16)  # A's init, reproducible per finetune
        return Trainer(self.vl.model, cfg, seed)

    def session(self, fid: str) -> Session:
        """The finetune's session: the cached one while state.pt is still its file, else loaded from disk
        (another process trained or deleted it). Not found once deleted, even by another process."""
        info = self.store.get(fid)
        with self._lock:
            cached = self._sessions.get(fid)
        if cached is not None and self.store.state_is(fid, cached.file):
            with self._lock:
                if self._sessions.get(fid) is cached:
                    self._sessions.move_to_end(fid)
            return cached
        trainer = self._new_trainer(fid, LoraConfig.from_dict(info.lora))
        file = self.store.state_file(fid)
        state = None if file is None else self.store.load_state(fid, file)
        if state is not None:
            trainer.load_state_dict(state)
        session = Session(fid, trainer, (state or {}).get("responses", {}), file)
        with self._lock:
            self._sessions[fid] = session  # over whatever is cached: one that is stale by now reloads when next used
            self._sessions.move_to_end(fid)
            while len(self._sessions) > self.cached_sessions:
                self._sessions.popitem(last=False)
        return session

    # --- rollouts and train steps -------------------------------------------------------------------

    def rollouts(self, body: dict[str, Any]) -> dict[str, Any]:
        fid = finetune_id_of(body)
        n = body.get("num_rollouts", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.limits.max_rollouts:
            raise TuningError(f"num_rollouts must be an integer in 1..{self.limits.max_rollouts}")
        req = parse_tuning_request(body.get("request"), self.image_of)
        truth = body.get("ground_truth")
        truth = None if truth is None else parse_target(req, truth, "ground_truth")
        step, live = self.session(fid).policy
        rollouts = sample_rollouts(self.vl, req, n, live, step, self.timeout)
        rewards = None if truth is None else [req.skill.reward(r["output"], truth) for r in rollouts]
        return {"request": body.get("request"), "rollouts": rollouts, "rewards": rewards}

    def train_step(self, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        fid = finetune_id_of(body)
        key = key or body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
            raise TuningError("an idempotency key must be a string of 1-256 characters")
        digest = body_digest(body)
        twin_key = (fid, "key:" + key if key else "body:" + digest)
        with self._lock:
            twin = self._inflight.get(twin_key)
            if twin is None:
                mine = self._inflight[twin_key] = Future()
        if twin is not None:
            return twin.result()  # the same request is running: its result is this one's
        try:
            result = self._apply(fid, body, key, digest)
            mine.set_result(result)
            return result
        except BaseException as e:
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(twin_key, None)

    def _apply(self, fid: str, body: dict[str, Any], key: str | None, digest: str) -> dict[str, Any]:
        with self.store.lock(fid):
            session = self.session(fid)
            if key is not None and key in session.responses:
                seen, response = session.responses[key]
                if seen != digest:
                    raise IdempotencyKeyReusedError(f"idempotency key {key!r} was used for a different train step")
                return response
            groups, lr, cfg = parse_step(body, self.image_of, self.vl.model.cfg, self.step_cfg, self.limits)
            return self._train(session, groups, lr, cfg, key, digest)

    def train_groups(self, fid: str, groups: list, lr: float, cfg: StepConfig | None = None) -> dict[str, Any]:
        """A train step from typed groups (the CLI's path), persisted like an API step."""
        with self.store.lock(fid):
            return self._train(self.session(fid), groups, lr, cfg or self.step_cfg, None, "")

    def _train(self, session: Session, groups: list, lr: float, cfg: StepConfig, key: str | None, digest: str) -> dict[str, Any]:
        """Train, then make the new state durable before anyone sees the response."""
        fid, trainer = session.fid, session.trainer
        try:
            out = trainer.train_step(groups, lr, cfg)
            if key is not None:
                session.responses[key] = (digest, out)
                while len(session.responses) > KEPT_KEYS:
                    session.responses.popitem(last=False)
            self.store.save_state(fid, trainer.state_dict() | {"responses": dict(session.responses)})
            session.file = self.store.state_file(fid)  # what we just saved (we hold the lock); the old one closes
        except BaseException:
            with self._lock:  # memory may be ahead of disk: reload from disk next time
                self._sessions.pop(fid, None)
            raise
        if out["applied"]:
            session.refresh()
            logged = {f"train/{k}": v for k, v in out.items() if isinstance(v, float)} | {"train/lr": lr}
            self.store.log_metrics(fid, trainer.step, logged)
        return out

    # --- metrics and checkpoints --------------------------------------------------------------------

    def log_metrics(self, fid: str, body: dict[str, Any]) -> dict[str, Any]:
        step, values = body.get("step"), body.get("metrics")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TuningError("step must be a non-negative integer")
        if not isinstance(values, dict):
            raise TuningError("metrics must be an object of name -> number")
        return {"ok": True, "step": step, "logged_count": self.store.log_metrics(fid, step, values)}

    def save_checkpoint(self, fid: str) -> dict[str, Any]:
        with self.store.lock(fid):
            trainer = self.session(fid).trainer
            return {"ok": True, "checkpoint": self.store.save_checkpoint(fid, trainer.step, trainer.checkpoint())}

    def list_checkpoints(self, fid: str, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        after = -1 if cursor in (None, "") else int_of(cursor, "cursor")
        items = [c for c in self.store.checkpoints(fid) if c["step"] > after]
        page, more = items[:limit], len(items) > limit
        return {"checkpoints": page, "next_cursor": str(page[-1]["step"]) if more else None, "has_more": more}

    def delete_checkpoint(self, fid: str, step: int) -> None:
        self.store.delete_checkpoint(fid, step)
        self.vl.engine.adapters.forget(f"{fid}@{step}")

    # --- serving ------------------------------------------------------------------------------------

    def resolve(self, name: str) -> Adapter | None:
        """`<finetune_id>@<step>` -> that checkpoint as an adapter (the engine's AdapterStore hook)."""
        fid, at, step = name.rpartition("@")
        if not at or not step.isdigit() or len(fid) != 26:
            return None
        info = self.store.get(fid)
        if info.base_model != self.base_name:
            raise FinetuneNotFoundError(f"finetune {fid} was trained on {info.base_model!r}, not on {self.base_name!r}")
        return adapter_from_checkpoint(name, self.store.load_checkpoint(fid, int(step)), self.vl.model)
