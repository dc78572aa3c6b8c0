"""The one root of the errors a user can cause and fix.

Everything finelake raises for a problem the user can fix (a bad profile key, a missing input
file, an upstream table not built yet, a model folder without a chat template, a lake whose
settings disagree with the profile) derives from :class:`FinelakeError`. The command line turns
exactly these into one line on stderr and exit status 1; anything else is a bug or an
infrastructure failure and keeps its traceback (``-v`` shows it for both).

This module imports nothing from finelake, so every layer (``finelake.method`` included) may use it.
"""

from __future__ import annotations


class FinelakeError(RuntimeError):
    """An error a user can cause and fix (bad input path, missing upstream table, bad setting).

    Its message says what is wrong and, where there is one, the command or key that fixes it.
    """


class ConfigError(FinelakeError, ValueError):
    """A profile or override is missing, malformed, or fails validation (the message names the
    key and the file that set it). Also a ``ValueError``, as before it had a root."""
