"""Errors a user causes (bad input, missing files, a busy workdir), told apart from bugs.

The command-line entry points (`res2net_jax.cli`) print a `UserError` as one line; any other
exception is a bug and keeps its traceback. Each subclass is also the builtin type a caller would
expect (ValueError, FileNotFoundError, ...).
"""


class UserError(Exception):
    """A problem with what the user asked for; the message names it and the fix."""


class InvalidInputError(UserError, ValueError):
    """A config value, name, or file content that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or must provide) is not there."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that already holds something: nothing is ever overwritten."""


class MissingDependencyError(UserError, ImportError):
    """An optional package this request needs is not installed."""
