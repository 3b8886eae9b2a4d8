"""The one error type for problems a user can cause and fix."""

from __future__ import annotations


class WsvizError(Exception):
    """A problem caused by user input (unknown model, bad upload, bad hyperparameter...).

    The message always says what went wrong and what to do about it; the app shows it
    with ``st.error`` and keeps working, the CLI prints it and exits with status 2.
    """
