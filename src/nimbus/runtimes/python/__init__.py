"""The Python runtime: ``bootstrap.py`` runs inside each instance (standard library only)."""
