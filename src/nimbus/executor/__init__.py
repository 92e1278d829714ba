"""Starts, talks to and kills instances.

Kept free of imports on purpose: ``sandbox`` and ``zygote`` modules are
imported by the zygote process, which runs with the standard library only.
The executor itself is :mod:`nimbus.executor.core`.
"""
