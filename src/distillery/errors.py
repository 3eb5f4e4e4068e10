"""User-facing errors.

Every error a user can cause (bad config, bad data, mismatched tokenizers, unwritable output, ...)
is raised as :class:`DistilleryError` with a one-line message that names the file, line or key.
The CLI prints ``error: <message>`` and exits with status 2; no traceback is shown unless
``DISTILLERY_DEBUG=1``.
"""


class DistilleryError(Exception):
    """An error caused by the user's input; its message is one line and names the culprit."""
