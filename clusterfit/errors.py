"""The one base of every bad-input error.

A `UserError` means the user's input cannot be used: a config key, a data file, a checkpoint, a
label file, storage that cannot be reached. Its message names the offending key, file or value and
says what to do; the command line prints it without a traceback and exits 2. Anything else that
escapes a step is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, not a bug; the message names the key, file or value and the fix."""
