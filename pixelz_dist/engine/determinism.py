"""``deterministic=True``: the settings under which a GPU run, too, is a pure function of its seed and snapshot.

On the CPU, pixelz_dist's resume is bit-exact as it is. On a GPU several kernels are not deterministic by default
(atomic adds in the backward of bilinear upsampling, index_add and scatter; cuDNN choosing a different convolution
algorithm per run when ``benchmark`` is on; cuBLAS's split workspaces), so two runs, or a run and its resume, drift
apart in the last bits and then further. This switches all of that off for the run and puts the process's previous
settings back afterwards:

- ``torch.use_deterministic_algorithms(True)``: an op with no deterministic implementation raises instead of running
  (turned into :class:`NondeterministicOp`, naming the op);
- ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``;
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when CUDA starts: set it in the environment, or let the
  command line set it before anything touches the GPU).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

from ..errors import NondeterministicOp

logger = logging.getLogger(__name__)

CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the two values NVIDIA documents as deterministic


def set_cublas_workspace() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for this process unless it is set already (call before CUDA starts)."""
    os.environ.setdefault(CUBLAS_VARIABLE, CUBLAS_DETERMINISTIC[0])


@contextmanager
def deterministic_mode(enabled: bool):
    """Within the block, deterministic algorithms everywhere (a no-op when ``enabled`` is False)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_VARIABLE))
    if saved[4] not in CUBLAS_DETERMINISTIC and torch.cuda.is_available() and torch.cuda.is_initialized():
        logger.warning("deterministic: CUDA started before %s was set, so cuBLAS may keep a nondeterministic "
                       "workspace. HINT: export %s=%s before starting Python (the command line's --deterministic "
                       "sets it early)", CUBLAS_VARIABLE, CUBLAS_VARIABLE, CUBLAS_DETERMINISTIC[0])
    if saved[4] not in CUBLAS_DETERMINISTIC:
        os.environ[CUBLAS_VARIABLE] = CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" in str(e):
            op = str(e).split(" does not have", 1)[0].strip()
            raise NondeterministicOp(
                f"deterministic=True, but the model runs {op}, which has no deterministic implementation on this "
                "device. HINT: replace it (for upsampling on a GPU, mode='nearest' or a transposed convolution; "
                "for scatter/index_add, a sort-based formulation), or train without deterministic=True "
                "(--deterministic): the run then resumes exactly on the CPU only, see "
                "docs/explanation/exact-resume.md") from e
        raise
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop(CUBLAS_VARIABLE, None)
        else:
            os.environ[CUBLAS_VARIABLE] = saved[4]
