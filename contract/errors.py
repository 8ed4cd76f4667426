"""Errors a user can cause, each with one clear line of text.

Both command lines catch `UserError`, print its message and exit with code 2 (a traceback only with
`--debug`). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base of every error caused by what the user gave us (input, files, options)."""


class InputError(UserError):
    """A bad image, prompt or generation argument."""


class ManifestError(UserError):
    """An export directory that is missing, incomplete, corrupt or from another toolkit version."""


class ExportError(UserError):
    """A model or export option the exporter cannot handle."""
