"""File changes in a directory on the node (watchfiles, i.e. inotify on Linux).

Changes are grouped until the directory has been quiet for ``debounce`` seconds, so
a burst of writes to one file, or a file written slowly, becomes one event; per
path, the group is folded (created then modified is *created*, created then
deleted is nothing). watchfiles reports a rename as a deletion and a creation; a
pair whose inode matches is turned back into one *moved* event (the source keeps
the inode of every file it has seen for that).

Each event is a :class:`~nimbus.triggers.sources.base.FileChange`: the file on the
node (``path``), relative to the watched directory (``key``), and inside the
function's sandbox (``local_path``, when the trigger mounts the directory), with its
size, mtime and an ``etag`` that changes whenever the file does (a hash of its
device, inode, size and mtime in nanoseconds: not of its content, which is never
read). The message's id is an S3-like ``sequencer``: hex, increasing. There is no
broker: an event that fails every retry goes to the function's dead-letter
destination.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import itertools
import os
import time
from typing import Any

from watchfiles import Change, awatch

from nimbus.triggers.sources.base import (
    ConfigurationError,
    Emit,
    FileChange,
    FileChangeKind,
    Message,
    keep_connected,
)
from nimbus.triggers.specs import FilesTrigger

#: The watcher wakes this often when nothing changes (to deliver settled paths), ms.
IDLE_WAKE_MS = 250
#: How long the watcher groups raw changes, ms (a path's own quiet time is ``debounce``).
WATCH_STEP_MS = 50


def etag_of(st: os.stat_result) -> str:
    """32 hex digits naming this version of a file: its device, inode, size and mtime."""
    version = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return hashlib.blake2b(version, digest_size=16).hexdigest()


def fold(before: str | None, change: Change) -> str | None:
    """What happened to a path, given what had (``None``: nothing, or it cancelled out)."""
    if change == Change.added:
        return "modified" if before == "deleted" else "created"
    if change == Change.modified:
        return before or "modified"
    return None if before == "created" else "deleted"


class FilesSource:
    def __init__(self, spec: FilesTrigger, context: Any) -> None:
        self.spec = spec
        self.context = context
        self.root = spec.path
        #: path → (inode, size, mtime) of every file seen: to recognise moves.
        self.known: dict[str, tuple[int, int, float]] = {}
        self._sequence = itertools.count()

    async def run(self, emit: Emit) -> None:
        what = f"{self.context.trigger} of {self.context.function}"
        await keep_connected(what, self.context.status, lambda: self._watch(emit))

    def _matches(self, path: str) -> bool:
        relative = os.path.relpath(path, self.root)
        if relative.startswith(".."):
            return False
        if not self.spec.recursive and os.sep in relative:
            return False
        name = os.path.basename(path)
        return any(
            fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p)
            for p in self.spec.patterns
        )

    def _scan(self) -> None:
        self.known.clear()
        for dirpath, dirnames, filenames in os.walk(self.root):
            if not self.spec.recursive:
                dirnames.clear()
            for name in filenames:
                self._remember(os.path.join(dirpath, name))

    def _unseen(self, directory: str) -> list[str]:
        return [
            os.path.join(dirpath, name)
            for dirpath, _, filenames in os.walk(directory)
            for name in filenames
            if os.path.join(dirpath, name) not in self.known
        ]

    def _remember(self, path: str) -> os.stat_result | None:
        try:
            st = os.stat(path)
        except OSError:
            self.known.pop(path, None)
            return None
        if not os.path.isdir(path):
            self.known[path] = (st.st_ino, st.st_size, st.st_mtime)
        return st

    async def _watch(self, emit: Emit) -> None:
        if not os.path.isdir(self.root):
            raise ConfigurationError(f"{self.root} is not a directory on this node")
        stop = asyncio.Event()
        await asyncio.to_thread(self._scan)
        quiet = self.spec.debounce
        #: path → (what happened to it so far, when it last changed): a path is
        #: delivered once it has been quiet for ``debounce`` seconds.
        pending: dict[str, tuple[str, float]] = {}
        try:
            async for changes in awatch(
                self.root,
                stop_event=stop,
                step=WATCH_STEP_MS,
                rust_timeout=max(WATCH_STEP_MS, min(IDLE_WAKE_MS, int(quiet * 500))),
                yield_on_timeout=True,
                recursive=self.spec.recursive,
            ):
                self.context.status.set("connected")
                now = time.monotonic()
                for change, path in sorted(changes, key=lambda c: (c[1], c[0].value)):
                    kind = fold(pending[path][0] if path in pending else None, change)
                    if kind is None:
                        pending.pop(path, None)
                        self.known.pop(path, None)
                    else:
                        pending[path] = (kind, now)
                    if change == Change.added and self.spec.recursive and os.path.isdir(path):
                        # Files made in a new directory before its watch was added are
                        # never reported: find them.
                        for found in await asyncio.to_thread(self._unseen, path):
                            pending.setdefault(found, ("created", now))
                due = {p: kind for p, (kind, at) in pending.items() if now - at >= quiet}
                for path in due:
                    del pending[path]
                for message in self._events(due) if due else ():
                    await emit(message)
        finally:
            stop.set()
        if not os.path.isdir(self.root):
            raise ConfigurationError(f"{self.root} was removed")

    def _events(self, folded: dict[str, str]) -> list[Message]:
        """Events for paths that have settled (``path → created|modified|deleted``)."""
        # A deleted path whose inode reappears under a created path was moved.
        gone = {
            self.known[p][0]: p
            for p, kind in folded.items()
            if kind == "deleted" and p in self.known
        }
        events: list[tuple[FileChangeKind, str, str | None, os.stat_result | None]] = []
        moved_from: set[str] = set()
        stats: dict[str, os.stat_result | None] = {}
        for path, kind in folded.items():
            if kind == "deleted":
                continue
            st = stats[path] = self._remember(path)
            if st is None or os.path.isdir(path):
                continue
            old = gone.get(st.st_ino) if kind == "created" else None
            if old is not None:
                moved_from.add(old)
                events.append(("moved", path, old, st))
            else:
                events.append(("created" if kind == "created" else "modified", path, None, st))
        for path, kind in folded.items():
            if kind == "deleted" and path not in moved_from:
                events.append(("deleted", path, None, None))
            if kind == "deleted":
                self.known.pop(path, None)
        return [
            self._message(kind, path, old, st)
            for kind, path, old, st in events
            if kind in self.spec.events and (self._matches(path) or (old and self._matches(old)))
        ]

    def _message(
        self, kind: FileChangeKind, path: str, old: str | None, st: os.stat_result | None
    ) -> Message:
        key = os.path.relpath(path, self.root)
        now = time.time()
        change = FileChange(
            change=kind,
            path=path,
            key=key,
            local_path=os.path.join(self.spec.mount, key) if self.spec.mount else None,
            size=st.st_size if st is not None else None,
            mtime=st.st_mtime if st is not None else None,
            etag=etag_of(st) if st is not None else None,
            # A write ended at the file's mtime; a deletion or a move is seen now.
            at=st.st_mtime if st is not None and kind in ("created", "modified") else now,
            old_path=old,
            old_key=os.path.relpath(old, self.root) if old is not None else None,
        )
        # Like S3's sequencer: hex, increasing with each event of the trigger.
        sequencer = f"{time.time_ns():016X}{next(self._sequence) % 0x10000:04X}"
        return Message(body=b"", id=sequencer, origin=change)
