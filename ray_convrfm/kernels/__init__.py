"""The kernel mathematics: patches, the ConvRFM kernel and its adjoint, the patch AGOP, ridge
solves. Pure functions of tensors and explicit parameters: no Ray, no I/O, no progress state
beyond optional bars. The user-facing entry points are ``conv_ntk`` and ``patch_agop``
(``api.py``); the mathematics is written out in docs/math.md."""

from ray_convrfm.kernels.api import conv_ntk, patch_agop
from ray_convrfm.kernels.kernel import KernelParams

__all__ = ["KernelParams", "conv_ntk", "patch_agop"]
