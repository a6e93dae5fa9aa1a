"""ray_convrfm: convolutional Recursive Feature Machines on Ray.

ConvRFM learns a patch metric M from the average gradient outer product (AGOP) of a kernel
predictor with respect to image patches, then refits with M inside a convolutional NTK
(Beaglehole et al., "Mechanism of feature learning in convolutional neural networks",
arXiv 2309.00570).
"""

__version__ = "0.1.0"

from ray_convrfm.kernels.api import conv_ntk, patch_agop  # noqa: E402
from ray_convrfm.models.convrfm import ConvRFM  # noqa: E402
from ray_convrfm.models.deep import DeepConvRFM  # noqa: E402
from ray_convrfm.models.rfm import RFMParams, RFMResult, fit_rfm  # noqa: E402
from ray_convrfm.options import (  # noqa: E402
    ClusterOptions,
    ComputeOptions,
    Options,
    SolveOptions,
    StoreOptions,
)

__all__ = ["ClusterOptions", "ComputeOptions", "ConvRFM", "DeepConvRFM", "Options",
           "RFMParams", "RFMResult", "SolveOptions", "StoreOptions", "conv_ntk", "fit_rfm",
           "patch_agop", "__version__"]
