"""The runtimes Nimbus can run, and how an instance of each is started.

A runtime turns a version into the command line and environment of an
instance. Code that runs *inside* an instance lives in the sub-packages
(``python/bootstrap.py``); it never imports Nimbus.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from nimbus.models import Account, Version

BOOTSTRAP = Path(__file__).parent / "python" / "bootstrap.py"
#: What Lambda sets for every function, before the function's own variables.
BASE_ENV = {
    "PATH": "/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin",
    "LD_LIBRARY_PATH": "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:"
    "/var/task:/var/task/lib:/opt/lib",
    "LANG": "en_US.UTF-8",
    "TZ": ":UTC",
    "PYTHONPATH": "/var/runtime",
    "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
}
#: Unsandboxed, an instance runs on the host's own root: no /var/lang, no en_US locale.
HOST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TZ": ":UTC"}


@dataclass(frozen=True, slots=True)
class PythonRuntime:
    """CPython running ``bootstrap.py`` isolated from Nimbus's own environment (-I -S)."""

    name: str
    executable: str

    def argv(self, sock_fd: int, token: str) -> list[str]:
        return [self.executable, "-I", "-S", str(BOOTSTRAP), str(sock_fd), token]

    def environment(
        self,
        version: Version,
        task_root: str,
        layer_root: str | None,
        instance_id: str,
        *,
        account: Account,
        sandboxed: bool = True,
        initialization: str = "on-demand",
    ) -> dict[str, str]:
        """The instance's whole environment, as Lambda's: its defaults, the function's
        variables, then what the platform sets (``initialization`` is
        ``AWS_LAMBDA_INITIALIZATION_TYPE``: ``on-demand``, or ``snap-start`` for the
        forks of a function zygote)."""
        spec = version.spec
        env = dict(BASE_ENV if sandboxed else HOST_ENV)
        env.update(spec.environment)
        if spec.logging.format == "JSON":
            env["AWS_LAMBDA_LOG_FORMAT"] = "JSON"
            if spec.logging.application_level:
                env["AWS_LAMBDA_LOG_LEVEL"] = spec.logging.application_level
        env.update(
            {
                "_HANDLER": spec.handler,
                "LAMBDA_TASK_ROOT": task_root,
                "LAMBDA_RUNTIME_DIR": "/var/runtime" if sandboxed else str(BOOTSTRAP.parent),
                "AWS_REGION": account.region,
                "AWS_DEFAULT_REGION": account.region,
                "AWS_LAMBDA_INITIALIZATION_TYPE": initialization,
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{self.name}",
                "AWS_LAMBDA_FUNCTION_NAME": spec.name,
                "AWS_LAMBDA_FUNCTION_VERSION": str(version.number),
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"[{version.number}]{instance_id}",
                "NIMBUS_FUNCTION_NAME": spec.name,
                "HOME": "/tmp",
            }
        )
        if layer_root is not None:
            env["NIMBUS_LAYER_ROOT"] = layer_root
        return env


def host_python() -> str:
    """The interpreter Nimbus runs on, outside any virtualenv."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def available_runtimes() -> dict[str, PythonRuntime]:
    """Runtimes this node can run: the host's CPython, by its ``pythonX.Y`` name."""
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return {name: PythonRuntime(name, host_python())}
