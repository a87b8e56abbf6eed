"""curvx: certified Hessian eigenpairs of a training loss, cheap enough for every step.

Public API:

* :func:`hvp` -- exact Hessian-vector products of the mean loss over a data set;
* :func:`eigsh` -- certified extreme eigenpairs (block Lanczos, float64 basis);
* :func:`track` -- a :class:`Tracker` that warm-starts from the last step's vectors
  and reports eigenvalues, residuals and rotation each step;
* :class:`HessianOperator`, :func:`lanczos` -- the operator and the solver apart.

``python -m curvx.info`` says whether the compiled extension is in use.
"""

__version__ = "0.1.0"

from curvx._warnings import CurvxWarning  # noqa: E402
from curvx.lanczos import EigResult, NotSymmetricError, lanczos  # noqa: E402
from curvx.operators import (  # noqa: E402
    HessianOperator,
    NonFiniteError,
    ParametersChangedError,
    hvp,
)
from curvx.spectrum import eigsh  # noqa: E402
from curvx.track import Tracker, TrackRecord, track  # noqa: E402

__all__ = [
    "CurvxWarning",
    "EigResult",
    "HessianOperator",
    "NonFiniteError",
    "NotSymmetricError",
    "ParametersChangedError",
    "TrackRecord",
    "Tracker",
    "__version__",
    "eigsh",
    "hvp",
    "lanczos",
    "track",
]
