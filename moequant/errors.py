"""Errors a user can act on. The CLI prints their message (no traceback unless --debug) and exits non-zero."""


class MoEQuantError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class UnsupportedModelError(MoEQuantError):
    pass


class NoMoEError(MoEQuantError):
    pass


class CalibrationError(MoEQuantError):
    pass


class PlanError(MoEQuantError):
    pass


class CheckpointError(MoEQuantError):
    pass


class HubError(CheckpointError):
    """A Hub id that cannot be had: unknown repository or revision, gated/unauthorised, or offline."""
