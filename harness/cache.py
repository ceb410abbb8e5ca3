"""Content-addressed on-disk cache for pretrained classifiers and reference points.

An entry is `<dir>/<kind>-<key>.pt`, where key = sha256 of everything that determines its
content. A build is written under a unique temporary name in the same folder and published
with an atomic link (or rename): readers never see a half-written file, and when two processes
build the same entry at once (file locks are unreliable on NFS) the first to publish wins and
the other discards its build and loads the winner's, so both use the same payload. Loads use
`torch.load(weights_only=True)` and verify the stored key, so a truncated, corrupted or misnamed
file is rejected and rebuilt, never used. A per-entry file lock, where the file system supports
one, saves the duplicate work: the first process builds, the others wait and load.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import sys
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


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=16)
def _parsed(module_source: str) -> ast.Module:
    return ast.parse(module_source)


def definition_source(module_source: str, name: str) -> str:
    """The code of the top-level definition of `name` in `module_source` (a def, a class or an
    assignment), normalised: docstrings, comments and layout dropped (`ast.unparse`), so it changes
    with what the code does and not with where it sits (file path, line numbers) or how it is worded."""
    for node in _parsed(module_source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
        else:
            continue
        if name in names:
            return ast.unparse(_strip_docstrings(copy.deepcopy(node)))
    raise KeyError(f"no top-level definition of {name!r} in the module (renamed? update the list that names it)")


def module_sources(modules) -> dict[str, str]:
    """{module name: its source text} of imported modules, read from their files now: taken when the
    modules are imported, it is the text of the code the process runs, even if a file is edited later."""
    return {name: inspect.getsource(sys.modules[name]) for name in modules}


def code_fingerprint(definitions: dict[str, tuple[str, ...]], sources: dict[str, str]) -> str:
    """sha256 of the normalised code (`definition_source`) of the named top-level definitions,
    `{module name: (definition name, ...)}`, in the module texts `sources` (`module_sources`): part of a
    cache key, so that an entry another version of that code built is not found."""
    return _fingerprint(tuple((m, tuple(sorted(definitions[m])), sources[m]) for m in sorted(definitions)))


@functools.lru_cache(maxsize=64)
def _fingerprint(parts: tuple[tuple[str, tuple[str, ...], str], ...]) -> str:
    digest = hashlib.sha256()
    for module, names, text in parts:
        for name in names:
            digest.update(f"{module}.{name}\n{definition_source(text, name)}\n".encode())
    return digest.hexdigest()[:24]


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

    def save(self, payload: dict) -> dict:
        """Publish `payload` unless a valid entry appeared meanwhile; returns the published payload
        (ours, or the one another process published first)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"key": self.key, "spec": json.dumps(self.spec, sort_keys=True, default=str),
                            "payload": payload}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)  # atomic, and fails if an entry is already there
            except FileExistsError:
                existing = self.load()
                if existing is not None:
                    return existing  # another process published first: use its payload
                os.replace(tmp, self.path)  # the file there is not a valid entry: replace it
            except OSError:
                os.replace(tmp, self.path)  # no hard links on this file system
            return payload
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def locked(self, use_lock: bool = True):
        """Best effort: an exclusive lock on the entry where the file system gives one. Without
        it (NFS without lockd, a read-only lock file, use_lock=False) builds may race, which the
        publishing in `save` makes harmless."""
        lock = None
        if use_lock:
            try:
                lock = open(self._lock_path, "w")
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as exc:
                log.debug("cache: no lock for %s (%s); building without one", self.path.name, exc)
                if lock is not None:
                    lock.close()
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    def get_or_build(self, build: Callable[[], dict], use_lock: bool = True) -> tuple[dict, bool]:
        """(payload, hit): load the entry, or build and publish it. Every process gets the payload
        that was published, whoever built it."""
        payload = self.load()
        if payload is not None:
            return payload, True
        with self.locked(use_lock):
            payload = self.load()  # another process may have built it while we waited
            if payload is not None:
                return payload, True
            return self.save(build()), False
