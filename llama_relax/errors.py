"""Errors a user can fix (a bad flag, a missing file, a server that answered with an error status).

Commands print these as one line and exit 2 (`llama_relax.cli.run_command`); every other exception is a bug and is
shown with its traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment; printed as one line."""


# Exceptions that carry a user-fixable condition wherever they come from: bad values, paths, permissions, ports.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)
