"""Errors the CLI reports as one clear line (no traceback)."""


class MegadistillError(RuntimeError):
    """A user-facing error: bad input, a corrupt file, an unsupported model."""


class UnsupportedTeacherError(MegadistillError):
    """The teacher's architecture has no adapter."""


class CheckpointError(MegadistillError):
    """A checkpoint is missing, corrupt, or does not match what loads it."""
