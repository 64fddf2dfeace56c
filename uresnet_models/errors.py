"""The error a user can fix by changing an argument or a path (no torch import here)."""


class UsageError(ValueError):
    """A bad argument, option or path: ``uresnet`` prints it as one line (no traceback hint) and
    exits with status 2. A ``ValueError``, so Python callers of :class:`~uresnet_models.train.TrainConfig`
    can catch it as one."""
