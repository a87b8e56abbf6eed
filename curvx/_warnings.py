"""The warning class of curvx."""


class CurvxWarning(UserWarning):
    """Warnings emitted by curvx, e.g. when the compiled kernels cannot be used."""
