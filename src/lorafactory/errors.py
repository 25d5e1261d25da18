"""User-facing errors: each carries a one-line message that names the problem and the fix."""

import errno
from collections.abc import Iterator


def first_line(exc: BaseException) -> str:
    """An exception's message for one line of output: its first line, or its class name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text else exc.__class__.__name__


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


class LorafactoryError(Exception):
    """Base class for errors shown to the user as one line, without a traceback."""

    exit_code = 1


class ConfigError(LorafactoryError):
    """A configuration file, preset or override is invalid."""

    exit_code = 2


class InputError(LorafactoryError):
    """Input data is missing, unreadable or unusable."""

    exit_code = 3


class StageError(LorafactoryError):
    """A pipeline stage failed for a reason the user can act on."""

    exit_code = 4


class QualityGateFailed(StageError):
    """The best checkpoint stayed below the quality gate after every allowed retrain."""

    exit_code = 5


class StaleStage(LorafactoryError):
    """A stage before the first one a run may execute is out of date, so that run cannot go on."""

    def __init__(self, stage: str, why: str) -> None:
        super().__init__(f"{stage} is out of date ({why}); it must run again first")
        self.stage = stage


class CharacterBusy(LorafactoryError):
    """Another live run holds the character."""

    exit_code = 6


def from_os_error(exc: OSError, where: object = "") -> LorafactoryError:
    """A one-line error for a failed file operation: what, where, and what to do."""
    place = exc.filename or where or "the workspace"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StageError(
            f"disk full at {place}: free space (`lorafactory prune` frees released characters' files) and rerun; "
            "nothing was lost"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"cannot access {place} ({exc.strerror}); fix its permissions or use another --workspace")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return InputError(f"{place} is in the way ({exc.strerror}); remove it or use another --workspace")
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"a path is too long ({place}); use a shorter --workspace or name")
    if exc.errno is None:  # not a file operation's error (a connection refused by a library, say): its own words
        return StageError(first_line(exc))
    return StageError(f"{exc.strerror or exc.__class__.__name__} at {place}")


def as_user_error(exc: Exception, where: object = "") -> Exception:
    """The one-line error that a library's exception stands for (the Hub's failure to give a model, a failed file
    operation at ``where``); ``exc`` itself when it is already one of ours or none of those."""
    if isinstance(exc, LorafactoryError):
        return exc
    from lorafactory.hubfetch import hub_failure

    hub = hub_failure(exc)
    if hub is not None:
        return hub
    return from_os_error(exc, where) if isinstance(exc, OSError) else exc
