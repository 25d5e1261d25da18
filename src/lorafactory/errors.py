"""User-facing errors: each carries a one-line message that names the problem and the fix."""


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


class CharacterBusy(LorafactoryError):
    """Another live run holds the character."""

    exit_code = 6
