"""Exceptions that the command line reports as one line, without a traceback, and the
warning category it prints as ``splitlbi: warning: ...``."""


class SplitLBIError(Exception):
    """A user-facing error: bad argument, missing or corrupt file, impossible request."""


class DataError(SplitLBIError):
    """A dataset is missing, corrupt, or cannot be downloaded."""


class SplitLBIWarning(UserWarning):
    """A run that will not give (or did not give) a useful path: Γ empty at the end, a coupled
    layer with nothing in the support, too few steps for ν (:mod:`splitlbi.optim.diagnostics`)."""
