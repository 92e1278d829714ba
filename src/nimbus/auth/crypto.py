"""The node key, and sealing what must be kept secret at rest with it.

The node key is 32 random bytes in ``<data dir>/node.key`` (mode 0600, made on first
use). :func:`seal` encrypts with AES-256-GCM (``cryptography``), a fresh 96-bit nonce
each time, the purpose as associated data (a blob sealed for one purpose does not
open for another); :func:`unseal` checks and decrypts. Used for the secrets of API
keys (SigV4 needs them, not just their hash) and for function secrets.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nimbus.errors import ServiceException

__all__ = ["NodeKey", "load_node_key"]

_VERSION = b"\x01"


class NodeKey:
    """A node's AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a node key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def unseal(self, blob: bytes, purpose: str) -> bytes:
        if blob[:1] != _VERSION or len(blob) < 29:
            raise ServiceException("a sealed value is damaged (unknown format)")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], purpose.encode())
        except InvalidTag:
            raise ServiceException(
                "a sealed value does not open with this node's key (node.key replaced?)"
            ) from None


def load_node_key(path: Path) -> NodeKey:
    """The key in ``path``, made (0600, atomically) when there is none."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> NodeKey:
    key = path.read_bytes()
    if len(key) != 32:
        raise ServiceException(
            f"the node key {path} is damaged ({len(key)} bytes, not 32): restore it from a "
            "backup (what it sealed does not open without it)"
        )
    return NodeKey(key)
