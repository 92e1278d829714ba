"""Nimbus: a self-hosted serverless platform.

The public surface is small on purpose: the server's settings and composition
root, and the error tree. Everything else is internal.
"""

from nimbus.config import Settings
from nimbus.errors import NimbusError

__all__ = ["NimbusError", "Settings", "__version__"]
__version__ = "0.1.0"
