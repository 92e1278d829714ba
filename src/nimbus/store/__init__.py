"""Where functions and their versions are kept: a protocol, its backends and a fake."""

from nimbus.store.base import FunctionStore, TriggerStateStore
from nimbus.store.memory import MemoryStore
from nimbus.store.sqlite import SqliteStore

__all__ = ["FunctionStore", "MemoryStore", "SqliteStore", "TriggerStateStore"]
