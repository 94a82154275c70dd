"""The error every operation raises for a user-facing failure."""


class OperationError(Exception):
    """A user-facing failure; the message is one line."""
