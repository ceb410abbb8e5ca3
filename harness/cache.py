"""Content-addressed on-disk cache for pretrained classifiers and reference points.

An entry is `<dir>/<kind>-<key>.pt`, where key = sha256 of everything that determines its
content. Writes go to a temp file in the same folder and are renamed into place (atomic); loads
use `torch.load(weights_only=True)` and verify the stored key, so a truncated, corrupted or
misnamed file is rejected and rebuilt, never used. A per-entry file lock makes concurrent
trials that want the same entry build it once: the first builds, the others wait and load.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def cache_dir(configured: str | None) -> Path:
    root = configured or os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "inversion-harness"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CacheEntry:
    def __init__(self, root: Path, kind: str, spec: dict[str, Any]):
        self.spec = spec
        self.key = content_key(spec)
        self.path = root / f"{kind}-{self.key}.pt"
        self._lock_path = root / f".{kind}-{self.key}.lock"

    def load(self) -> dict | None:
        """The stored payload, or None if absent or not a valid entry for this key."""
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("cache: rejecting unreadable %s (%s)", self.path.name, exc)
            return None
        if not isinstance(blob, dict) or blob.get("key") != self.key or "payload" not in blob:
            log.warning("cache: rejecting %s: stored key does not match", self.path.name)
            return None
        return blob["payload"]

    def save(self, payload: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"key": self.key, "spec": json.dumps(self.spec, sort_keys=True, default=str),
                            "payload": payload}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def locked(self):
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_build(self, build: Callable[[], dict]) -> tuple[dict, bool]:
        """(payload, hit): load the entry, or build and store it once across processes."""
        payload = self.load()
        if payload is not None:
            return payload, True
        with self.locked():
            payload = self.load()  # another process may have built it while we waited
            if payload is not None:
                return payload, True
            payload = build()
            self.save(payload)
            return payload, False
