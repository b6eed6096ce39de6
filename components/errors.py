"""User-facing errors: the CLI prints these as one line and exits 2, without a traceback."""


class UserError(Exception):
    """Bad input or missing prerequisite that the user can fix; the message says how."""

    exit_code = 2
