"""The one error type for "the user asked for something invalid", and its kinds.

Every check of something a user can get wrong (a flag value, a config file, a checkpoint, an
input the model cannot take, a grid root) raises a `UsageError`; the command line prints it as
one line `error: ...` with exit code 2. Anything else is a bug and keeps its traceback.

`tasks` and `solvers` stand alone (they import nothing of deqloop), so they keep their own:
`tasks.TaskInputError` (a malformed puzzle, a difficulty without data) is caught beside
UsageError (USER_ERRORS); a solver's unknown name or option is turned into a ConfigError where
deqloop builds a SolveConfig.
"""

from __future__ import annotations

from tasks import TaskInputError


class UsageError(ValueError):
    """Something the user asked for cannot be done as asked; the message says what and why."""


class ConfigError(UsageError):
    """Settings that cannot run: a bad value, an unknown name, a resume that changes them."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong kind (a string where a number goes)."""


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: missing, damaged, or from another deqloop."""


class InputError(UsageError):
    """An input the model cannot take (longer than its positions, the wrong board size)."""


USER_ERRORS = (UsageError, TaskInputError)
