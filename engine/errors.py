"""Typed errors. Every message names the file or tensor at fault and says what to do about it."""
from __future__ import annotations

__all__ = [
    "GraftError",
    "Interrupted",
    "Terminated",
    "SpecError",
    "StorageError",
    "NotFoundError",
    "HeaderError",
    "CheckpointError",
    "PlanError",
    "QuantizationError",
    "IntegrityError",
    "NonFiniteError",
    "OutputError",
]


class GraftError(Exception):
    """Base of every error graft raises on purpose; the CLI prints its message as one line."""


class SpecError(GraftError):
    """The job spec is invalid (unknown key, bad value, bad override).

    ``problems`` lists every problem found, one line each; the message is those lines.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


class StorageError(GraftError):
    """A file could not be listed, read or written."""


class NotFoundError(StorageError):
    """The file is not there (as opposed to a store that failed to answer)."""


class HeaderError(GraftError):
    """A safetensors header is malformed or inconsistent with its file."""


class CheckpointError(GraftError):
    """A checkpoint directory is unusable: no safetensors, a bad index, pickle-only weights."""


class PlanError(GraftError):
    """The three checkpoints cannot be combined as asked (missing tensors, shape mismatch, ...).

    ``problems`` lists every problem found; the message is the first one.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


class QuantizationError(PlanError):
    """A checkpoint is quantized in a way graft cannot decode honestly (GPTQ, AWQ, NVFP4, ...), or
    its FP8 tensors and config.json disagree."""


class IntegrityError(GraftError):
    """Bytes on storage do not match what was planned or recorded (size, sha256, changed input)."""


class NonFiniteError(GraftError):
    """An output tensor holds NaN or Inf and the spec does not allow it."""


class OutputError(GraftError):
    """The output location cannot be used (already committed, or holds foreign files)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler: a run stops as it does on Ctrl-C."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, its output left ready to resume: ``kept`` of ``total``
    shards are committed and journaled at ``output``, temporaries removed; the same command resumes.
    ``committed``: the stop came after the manifest was written; the output is complete."""

    def __init__(self, output: str, kept: int, total: int, terminated: bool, committed: bool = False):
        super().__init__(f"{output}: interrupted with {kept} of {total} shard(s) kept")
        self.output, self.kept, self.total, self.terminated = output, kept, total, terminated
        self.committed = committed
