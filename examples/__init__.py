"""Runnable examples of graft (not part of the installed package)."""
