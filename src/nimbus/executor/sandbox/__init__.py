"""The instance sandbox: namespaces, a minimal read-only root, a cgroup, an
unprivileged identity, rlimits and a seccomp filter.

Every module here that runs inside the zygote imports the standard library
only (plus libseccomp through ctypes, loaded by path).
"""
