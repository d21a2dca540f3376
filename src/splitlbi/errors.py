"""Exceptions that the command line reports as one line, without a traceback."""


class SplitLBIError(Exception):
    """A user-facing error: bad argument, missing or corrupt file, impossible request."""


class DataError(SplitLBIError):
    """A dataset is missing, corrupt, or cannot be downloaded."""
