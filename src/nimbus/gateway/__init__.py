"""The HTTP data plane: ``ANY /function/{name}[/{path}]``."""

from nimbus.gateway.app import Gateway

__all__ = ["Gateway"]
