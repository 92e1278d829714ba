"""The HTTP data plane: ``ANY /function/{name}[/{path}]``, and its asynchronous twin
``ANY /async-function/{name}[/{path}]``."""

from nimbus.gateway.app import Gateway
from nimbus.gateway.asyncapp import AsyncGateway

__all__ = ["AsyncGateway", "Gateway"]
