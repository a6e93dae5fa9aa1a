"""ray_convrfm: convolutional Recursive Feature Machines on Ray.

ConvRFM learns a patch metric M from the average gradient outer product (AGOP) of a kernel
predictor with respect to image patches, then refits with M inside a convolutional NTK
(Beaglehole et al., "Mechanism of feature learning in convolutional neural networks",
arXiv 2309.00570).
"""

from ray_convrfm.kernels.api import conv_ntk, patch_agop
from ray_convrfm.models.convrfm import ConvRFM
from ray_convrfm.models.deep import DeepConvRFM
from ray_convrfm.models.rfm import RFMParams, RFMResult, fit_rfm
from ray_convrfm.options import (
    ClusterOptions,
    ComputeOptions,
    Options,
    SolveOptions,
    StoreOptions,
)
from ray_convrfm.version import __version__

__all__ = ["ClusterOptions", "ComputeOptions", "ConvRFM", "DeepConvRFM", "Options",
           "RFMParams", "RFMResult", "SolveOptions", "StoreOptions", "conv_ntk", "fit_rfm",
           "patch_agop", "__version__"]
