"""The control-plane REST API under ``/v1``."""

from nimbus.api.app import build_api

__all__ = ["build_api"]
