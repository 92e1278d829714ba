"""Where functions and their versions are kept: a protocol and its backends."""

from nimbus.store.base import FunctionStore
from nimbus.store.sqlite import SqliteStore

__all__ = ["FunctionStore", "SqliteStore"]
