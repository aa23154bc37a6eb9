"""The CBC solver both planner MIPs run on, reached through PuLP's current API.

PuLP 3.3.2 deprecates ``PULP_CBC_CMD`` (the solver class for the binary bundled with PuLP; both go in PuLP 4.0)
in favour of ``COIN_CMD`` with a CBC from the ``cbcbox`` wheel (``pip install 'pulp[cbc]'``) or on ``PATH``.
``PULP_CBC_CMD`` is a thin subclass of ``COIN_CMD`` that only fixes the binary's path, so ``COIN_CMD`` on the
same binary runs the same command line and writes the same log: time limit, relative gap and the log the MIP
planner parses behave exactly as before.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from memopt.errors import MemoptError

__all__ = ["cbc_path", "cbc_solver"]


def cbc_path() -> str:
    """The CBC binary to run: the one PuLP 3 bundles, else ``cbcbox``'s, else ``cbc`` on ``PATH``.

    The bundled binary (CBC 2.10.3 in every PuLP 3 wheel) is what the planner has always run and is tested
    on, so it comes first while it is there; ``cbcbox`` (``pip install 'pulp[cbc]'``, PuLP 4's source) and
    ``PATH`` serve platforms without it. cbcbox's CBC is a development build: it solves the same programs,
    but was seen to stop up to 1e-4 above the optimum that CBC 2.10.3 reaches.

    Raises:
        MemoptError: no runnable CBC binary was found.
    """
    import pulp

    # A class attribute, read without constructing the deprecated solver (which is what warns).
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    try:
        import cbcbox  # type: ignore[import-not-found]

        boxed = cbcbox.cbc_bin_path()
    except Exception:  # not installed, or no build for this machine: try PATH
        boxed = None
    if boxed and os.access(boxed, os.X_OK):
        return boxed
    on_path = shutil.which("cbc")
    if on_path:
        return on_path
    raise MemoptError(f"no CBC solver found for PuLP {pulp.__version__} (no runnable bundled binary at {bundled!r}, "
                      "no cbcbox, no 'cbc' on PATH); install one with pip install 'pulp[cbc]'")


def cbc_solver(*, time_limit_s: float, gap_rel: float, log_path: str | None = None, warm_start: bool = False) -> Any:
    """A silent ``pulp.COIN_CMD`` on ``cbc_path()``.

    Args:
        time_limit_s (float): wall-clock limit, seconds; CBC returns its incumbent after it.
        gap_rel (float): relative gap at which CBC stops.
        log_path (str | None, default None): where CBC writes its log.
        warm_start (bool, default False): pass the variables' initial values as a MIP start.
    """
    import pulp

    return pulp.COIN_CMD(path=cbc_path(), msg=False, timeLimit=time_limit_s, gapRel=gap_rel, logPath=log_path,
                         warmStart=warm_start)
