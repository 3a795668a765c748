"""The one error type of the data pipeline."""

from megadistill.errors import MegadistillError


class DataError(MegadistillError):
    """A data source, cache or loader state is missing, malformed or does not match."""
