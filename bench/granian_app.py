"""The Nimbus node as an ASGI app for granian, so bench/run.py can compare HTTP server stacks.

``nimbus up`` serves :class:`nimbus.server.Nimbus` with uvicorn (uvloop + httptools);
bench/run.py also serves the very same app with granian's ASGI interface::

    NIMBUS_DATA_DIR=<tmp> granian --interface asgi --factory --loop uvloop --workers 1 \
        --host 127.0.0.1 --port <free> --working-dir bench granian_app:app

Settings come from the ``NIMBUS_*`` variables, as for ``nimbus up``. Everything else (the
sandboxed launcher, the zygote, stores) is the node's own: its ASGI lifespan starts and
stops it, as under uvicorn. Only the benchmark uses this file.
"""

from __future__ import annotations

import logging
import os
import sys

from nimbus.config import Settings
from nimbus.server import Nimbus, SandboxUnavailable


def app() -> Nimbus:
    """granian's ``--factory`` target: one node, configured like ``nimbus up``."""
    settings = Settings.from_env(os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return Nimbus(settings)
    except SandboxUnavailable as e:
        print(f"granian_app: {e.message}", file=sys.stderr)
        raise SystemExit(1) from None
