"""Exceptions shared by every sub-command, and the one exit-code convention.

Exit codes of every ``scalelab`` command (also in ``scalelab --help``):

* 0  ok;
* 1  a check failed or a run failed (corrupt data, mismatched hash, training error,
     a full disk);
* 2  bad usage or a bad config (a field, file or path the user gave);
* 75 stopped after a checkpoint, to be requeued (EX_TEMPFAIL).

Every user or environment error is exactly one ``scalelab CMD: error: MESSAGE`` line
and its code, never a traceback; a traceback means a bug in scalelab.
"""

from __future__ import annotations

import errno
import sys
import time

from scalelab import rank as rank_rule

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75

#: OSErrors that are the environment failing a correct request (exit 1); any other
#: OSError is a path the user gave that cannot be used (exit 2).
_RUN_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.ENOMEM,
    errno.EFBIG,
    errno.ESTALE,
    errno.ETIMEDOUT,
}

EXIT_CODES_HELP = (
    "exit codes: 0 ok; 1 a check or a run failed (corrupt data, mismatched hash, "
    "training error, full disk); 2 bad usage or bad config; 75 stopped after a "
    "checkpoint, to be requeued. Errors are one line: scalelab CMD: error: ..."
)


class ScalelabError(Exception):
    """The base of every error scalelab reports in one line: it carries its exit code.

    :func:`describe` (and so ``scalelab.cli.main``) maps any of them to
    ``scalelab CMD: error: MESSAGE`` and :attr:`exit_code`, in one place; a subclass
    states its code instead of a caller choosing one.
    """

    exit_code = EXIT_FAILED


class UsageError(ScalelabError):
    """Bad user input (config field, file, argument).

    The CLI reports it as one line ``scalelab CMD: error: MESSAGE`` and exits
    :attr:`exit_code`. The message must name the offending field, file or rank.
    """

    exit_code = EXIT_USAGE


class DataError(UsageError):
    """A dataset file is missing, truncated or does not match its checksum.

    Reported in one line like a usage error, but it is a failed check: exit 1.
    """

    exit_code = EXIT_FAILED


class CheckFailed(UsageError):
    """A check the user asked for failed (verify, doctor, a mismatched digest): exit 1."""

    exit_code = EXIT_FAILED


def environment_cause(exc: BaseException, depth: int = 5) -> OSError | None:
    """The ENOSPC-like OSError behind ``exc`` (itself, or one it was raised while
    handling), if any."""
    if isinstance(exc, OSError) and exc.errno in _RUN_ERRNOS:
        return exc
    seen = exc.__cause__ or exc.__context__
    while seen is not None and depth > 0:
        if isinstance(seen, OSError) and seen.errno in _RUN_ERRNOS:
            return seen
        seen, depth = seen.__cause__ or seen.__context__, depth - 1
    return None


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of an error a user can act on.

    None for anything else: an unexpected exception is a bug and keeps its traceback.
    """
    if isinstance(exc, ScalelabError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"input is not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 file",
            EXIT_USAGE,
        )
    if not isinstance(exc, OSError):
        # Libraries re-raise a full disk as their own error (torch.save: RuntimeError
        # "unexpected pos" while handling the ENOSPC); the disk is still the cause.
        cause = environment_cause(exc)
        exc = cause if cause is not None else exc
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        what = exc.strerror or type(exc).__name__
        text = f"{where}: {what}" if where else what
        return text, EXIT_FAILED if exc.errno in _RUN_ERRNOS else EXIT_USAGE
    return None


#: Seconds a rank other than 0 waits before reporting bad input (see :func:`report_error`).
USAGE_GRACE_S = 3.0


def process_rank() -> str:
    """This process's rank under any launcher ("0" for a single process):
    :func:`scalelab.rank.process_rank`, the rule :func:`scalelab.layout.detect` follows."""
    return rank_rule.process_rank()


def report_error(command: str, exc: BaseException) -> int | None:
    """Print the one error line of ``exc`` and return its exit code (None: a bug).

    With several ranks the same bad input fails on every rank, and rank 0 says so. The
    launcher ends the job when the first rank exits, so on bad input the other ranks wait
    a moment for rank 0's line to get out; if the job is still alive then, the input was
    bad on this rank alone (a device it lacks) and it reports for itself. Other errors
    name their rank at once.
    """
    found = describe(exc)
    if found is None:
        return None
    message, code = found
    rank = process_rank()
    if rank != "0":
        if code == EXIT_USAGE:
            time.sleep(USAGE_GRACE_S)
        message = f"rank {rank}: {message}"
    print(f"scalelab {command}: error: {message}", file=sys.stderr, flush=True)
    return code


class BadInputData(DataError):
    """A source dataset the user pointed at is missing or malformed: bad input, exit 2
    (a staged dataset that fails its checksums is a :class:`DataError`, exit 1)."""

    exit_code = EXIT_USAGE
