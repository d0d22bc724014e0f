"""The errors a user can cause and fix: bad config, data, checkpoint, disk or network.

Every such error derives from `UserError`. The command-line programs print its
message as one line and exit with status 2 (a traceback only on request), so a
message must name the cause, the file or key involved, and what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave the program, explained by its message."""


class ConfigError(UserError, ValueError):
    """An invalid training config (every problem found is listed in the message)."""
