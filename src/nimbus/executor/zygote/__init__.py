"""The zygote: a process with the runtime already loaded that forks instances.

``main.py`` and ``spawn.py`` run *in* the zygote (standard library only);
``client.py`` is the server's side (the ``ZygoteLauncher``).
"""
