"""Exceptions shared by every sub-command."""


class UsageError(Exception):
    """Bad user input (config field, file, argument).

    The CLI reports it as one line ``scalelab CMD: error: MESSAGE`` and exits 2.
    The message must name the offending field, file or rank.
    """


class DataError(UsageError):
    """A dataset file is missing, truncated or does not match its checksum."""
