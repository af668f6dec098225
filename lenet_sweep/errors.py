"""The one exception type entry points turn into a one-line message instead of a traceback."""


class UserError(ValueError):
    """Bad input the user can fix (data folder, config value, store); the message says how."""
