"""Code that runs inside an instance (``python/bootstrap.py``), and the table of
runtimes (:mod:`nimbus.runtimes.registry`).

Kept free of imports: the zygote imports the bootstrap with the standard
library only.
"""
