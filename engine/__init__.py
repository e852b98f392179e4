"""graft.engine: the pure fine-tuning-transfer engine (no Ray)."""
__version__ = "0.1.0"
