"""The one exception type for mistakes in user input."""


class UserError(Exception):
    """A mistake the user can fix (bad key, value, path): reported as one line, exit status 2.

    The message names the key, the bad value and what is allowed, e.g.
    ``batch_size=0: must be a positive integer``.
    """
