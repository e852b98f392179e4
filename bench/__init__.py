"""graft's benchmark: ``make bench`` (see bench/run.py, bench/NOTES.md)."""
