"""Function code in and out: zip validation, the content-addressed code store, dependency layers.

- :class:`CodeStore` validates an uploaded zip and unpacks it read-only under
  ``code/<sha256>/``;
- :class:`LayerStore` installs a ``requirements.txt`` with pip into a cached,
  read-only ``layers/<key>/``;
- :func:`package_directory` builds the deterministic zip the CLI uploads.
"""

from nimbus.packaging.code import CodeStore
from nimbus.packaging.layers import LayerStore, has_requirements
from nimbus.packaging.zips import package_directory

__all__ = ["CodeStore", "LayerStore", "has_requirements", "package_directory"]
