"""The control plane's function registry: deploy, update, delete, look up.

:class:`Functions` owns the in-memory map of current versions (the invoke
path's only lookup: a dict get), and keeps it consistent with the store, the
code and layer stores, the scheduler's pools and the logs. A deploy either
publishes a whole new version or changes nothing: code is unpacked and
dependencies are installed *before* the version is written, and the previous
version serves until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from nimbus.errors import (
    FunctionInitError,
    InvalidParameterValue,
    ResourceConflict,
    ResourceNotFound,
)
from nimbus.models import FunctionRecord, FunctionSpec, Version, parse_spec
from nimbus.observability.logs import LogStore
from nimbus.packaging import CodeStore, LayerStore
from nimbus.packaging.layers import has_requirements
from nimbus.scheduling import Scheduler
from nimbus.store import FunctionStore

log = logging.getLogger("nimbus.functions")

#: ``progress(step, message)``: what a deploy is doing (``code``, ``dependencies`` with
#: pip's lines, ``init``), for a client that shows it.
Progress = Callable[[str, str], None]
#: Runs a version's init before it is published: its error (Lambda's JSON) or None.
Verify = Callable[[Version], Awaitable[bytes | None]]


def _quiet(_step: str, _message: str) -> None:
    return None


class Functions:
    def __init__(
        self,
        store: FunctionStore,
        code: CodeStore,
        layers: LayerStore,
        scheduler: Scheduler,
        logs: LogStore,
        runtimes: frozenset[str],
        on_delete: Callable[[str], Awaitable[None]] | None = None,
        check: Callable[[FunctionSpec], None] | None = None,
        verify: Verify | None = None,
    ) -> None:
        self._store = store
        self._code = code
        self._layers = layers
        self._scheduler = scheduler
        self._logs = logs
        self._runtimes = runtimes
        self._on_delete = on_delete
        #: What this node allows beyond the spec's own rules (raises InvalidParameterValue).
        self._check = check
        #: The deploy-time verdict: a version whose init fails is not published.
        self._verify = verify
        self._records: dict[str, FunctionRecord] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._listeners: list[Callable[[str], None]] = []
        #: Deploys between their code put and their publish: no collection meanwhile.
        self._publishing = 0
        self._not_collecting = asyncio.Event()
        self._not_collecting.set()

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` (synchronously) after ``name`` is published or deleted."""
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        for listener in self._listeners:
            listener(name)

    async def load(self) -> None:
        self._records = {r.name: r for r in await self._store.load()}
        for record in self._records.values():
            self._scheduler.ensure(record.current)

    # -- reads (no I/O) ---------------------------------------------------------------
    def current(self, name: str) -> Version:
        """The version that serves ``name`` now. The invoke path's lookup."""
        record = self._records.get(name)
        if record is None:
            raise ResourceNotFound(f"function {name!r} does not exist")
        return record.current

    def get(self, name: str) -> FunctionRecord:
        record = self._records.get(name)
        if record is None:
            raise ResourceNotFound(f"function {name!r} does not exist")
        return record

    def all(self) -> list[FunctionRecord]:
        return [self._records[k] for k in sorted(self._records)]

    async def versions(self, name: str) -> list[Version]:
        return await self._store.versions(name)

    # -- writes -----------------------------------------------------------------------
    async def create(
        self,
        spec_data: Any,
        zip_path: Path,
        *,
        force: bool = False,
        progress: Progress = _quiet,
    ) -> FunctionRecord:
        """A new function from a spec and code. Its init runs first: if it fails, nothing
        is created (:class:`FunctionInitError`), unless ``force``."""
        spec = parse_spec(spec_data, known_runtimes=self._runtimes)
        async with self._locks[spec.name]:
            if spec.name in self._records:
                raise ResourceConflict(
                    f"function {spec.name!r} already exists; update it with "
                    f"PUT /v1/functions/{spec.name} (or `nimbus deploy`)"
                )
            return await self._publish(
                spec, zip_path, None, create=True, force=force, progress=progress
            )

    async def update(
        self,
        name: str,
        spec_data: Any | None,
        zip_path: Path | None,
        *,
        force: bool = False,
        progress: Progress = _quiet,
    ) -> FunctionRecord:
        """A new version from new code and/or spec fields (given fields replace current ones).

        Sending the code and spec that already serve publishes nothing.
        """
        if spec_data is None and zip_path is None:
            raise InvalidParameterValue("nothing to update: send a new 'spec', 'code', or both")
        async with self._locks[name]:
            current = self.current(name)
            spec = current.spec
            if spec_data is not None:
                if not isinstance(spec_data, dict):
                    raise InvalidParameterValue(
                        "invalid function spec: expected a mapping of fields"
                    )
                if spec_data.get("name", name) != name:
                    raise InvalidParameterValue(
                        f"invalid function spec: name: cannot rename {name!r} to "
                        f"{spec_data['name']!r}; deploy a new function instead"
                    )
                merged = current.spec.model_dump(mode="json")
                for key, value in spec_data.items():
                    if (
                        isinstance(value, dict)
                        and isinstance(merged.get(key), dict)
                        and key == "scaling"
                    ):
                        merged[key] = {**merged[key], **value}
                    else:
                        merged[key] = value
                spec = parse_spec(merged, known_runtimes=self._runtimes)
            return await self._publish(
                spec,
                zip_path,
                current,
                create=False,
                skip_unchanged=True,
                force=force,
                progress=progress,
            )

    async def deploy(
        self,
        spec_data: Any,
        zip_path: Path,
        *,
        force: bool = False,
        progress: Progress = _quiet,
    ) -> tuple[FunctionRecord, bool]:
        """Create or replace (the whole spec, as ``nimbus deploy`` does); ``(record, changed)``.

        Deploying the same code and spec again publishes nothing.
        """
        spec = parse_spec(spec_data, known_runtimes=self._runtimes)
        if spec.name not in self._records:
            return await self.create(spec_data, zip_path, force=force, progress=progress), True
        async with self._locks[spec.name]:
            before = self.current(spec.name)
            record = await self._publish(
                spec,
                zip_path,
                before,
                create=False,
                skip_unchanged=True,
                force=force,
                progress=progress,
            )
            return record, record.current.number != before.number

    async def delete(self, name: str) -> None:
        async with self._locks[name]:
            self.get(name)
            await self._store.delete(name)
            self._records.pop(name, None)
            self._changed(name)
            self._scheduler.retire(name)
            await self._logs.delete_function(name)
            if self._on_delete is not None:
                await self._on_delete(name)
        self._locks.pop(name, None)

    async def collect_garbage(self) -> tuple[int, int]:
        """Remove code and layers no version of any function references, and none a
        running instance uses: ``(trees, bytes)``. Skipped while a deploy is on its way
        (it may hold code no version names yet); the next collection gets it."""
        if self._publishing:
            return 0, 0
        self._not_collecting.clear()
        try:
            keep = await self._store.referenced()
            for inst in self._scheduler.instances():
                keep.add(inst.version.code_sha256)
                if inst.version.layer_sha256:
                    keep.add(inst.version.layer_sha256)
            code = await asyncio.to_thread(self._code.collect, keep)
            layers = await asyncio.to_thread(self._layers.collect, keep)
        finally:
            self._not_collecting.set()
        trees, freed = code[0] + layers[0], code[1] + layers[1]
        if trees:
            log.info("collected %d unused code trees and layers (%d bytes)", trees, freed)
        return trees, freed

    async def _publish(
        self,
        spec: FunctionSpec,
        zip_path: Path | None,
        current: Version | None,
        *,
        create: bool,
        skip_unchanged: bool = False,
        force: bool = False,
        progress: Progress = _quiet,
    ) -> FunctionRecord:
        await self._not_collecting.wait()
        self._publishing += 1
        try:
            return await self._publish_version(
                spec,
                zip_path,
                current,
                create=create,
                skip_unchanged=skip_unchanged,
                force=force,
                progress=progress,
            )
        finally:
            self._publishing -= 1

    async def _publish_version(
        self,
        spec: FunctionSpec,
        zip_path: Path | None,
        current: Version | None,
        *,
        create: bool,
        skip_unchanged: bool,
        force: bool,
        progress: Progress,
    ) -> FunctionRecord:
        if self._check is not None:
            self._check(spec)
        if zip_path is not None:
            progress("code", "unpacking the code")
            code = await asyncio.to_thread(self._code.put, zip_path)
        else:
            assert current is not None
            code = current.code_sha256
        self._code.check_handler(code, spec.handler)
        unchanged = current is not None and current.spec == spec and current.code_sha256 == code
        if skip_unchanged and unchanged:
            return self._records[spec.name]
        requirements = self._code.requirements(code)
        layer = None
        if requirements is not None and has_requirements(requirements):
            progress("dependencies", "installing requirements.txt")
            layer = await self._layers.ensure(
                requirements, spec.runtime, lambda line: progress("dependencies", line)
            )
        # The version as it will be published (the store assigns numbers in order, and this
        # function's lock is held): its init runs now, before it can take traffic.
        uid = current.uid if current is not None else await self._store.reserve_uid()
        number = current.number + 1 if current is not None else 1
        candidate = Version(spec, number, code, layer, time.time(), uid)
        if self._verify is not None:
            progress("init", f"running the init of version {number}")
            error = await self._verify(candidate)
            if error is not None:
                details = _error_details(error)
                what = f"{details.get('errorType')}: {details.get('errorMessage')}"
                if not force:
                    kept = (
                        f"; version {current.number} keeps serving" if current is not None else ""
                    )
                    raise FunctionInitError(
                        f"version {number} of {spec.name!r} was not published: its init failed: "
                        f"{what}{kept} (`nimbus deploy --force`, or force=true, publishes "
                        "it anyway)",
                        details,
                    )
                progress("init", f"the init failed ({what}); publishing anyway (force)")
        record = await self._store.publish(spec, code, layer, create=create, uid=uid)
        if record.current.number != number:
            log.warning(
                "function %s: published as version %d, its init ran as version %d",
                spec.name,
                record.current.number,
                number,
            )
        self._records[spec.name] = record
        self._changed(spec.name)
        self._scheduler.retire(spec.name, keep=record.current.number)
        self._scheduler.ensure(record.current)
        self._scheduler.prepare(record.current)
        return record


def _error_details(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return {"errorType": "Runtime.Unknown", "errorMessage": body.decode("utf-8", "replace")}
    return {k: doc[k] for k in ("errorType", "errorMessage", "stackTrace") if k in doc}


def read_spec_file(directory: Path) -> dict[str, Any]:
    """``directory/nimbus.yaml`` as a mapping, or a clear ``InvalidParameterValue``."""
    import yaml

    path = directory / "nimbus.yaml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InvalidParameterValue(
            f"{path}: no such file (a function directory needs nimbus.yaml)"
        ) from None
    except OSError as e:
        raise InvalidParameterValue(f"{path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidParameterValue(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InvalidParameterValue(f"{path}: expected a mapping of fields")
    return data
