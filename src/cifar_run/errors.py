"""The one exception type for mistakes in user input."""


class UserError(Exception):
    """A mistake the user can fix (bad key, value, path): reported as one line, exit status 2.

    The message names the key, the bad value and what is allowed, e.g.
    ``batch_size=0: must be a positive integer``.
    """


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, another config).

    Never answered by a silent restart from scratch: the message names the file.
    """


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the message names epoch, step and lr.

    A user error (exit status 2) because the usual fix is a setting: a lower `lr`.
    """
