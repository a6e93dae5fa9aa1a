"""ray_convrfm: convolutional Recursive Feature Machines on Ray.

ConvRFM learns a patch metric M from the average gradient outer product (AGOP) of a kernel
predictor with respect to image patches, then refits with M inside a convolutional NTK
(Beaglehole et al., "Mechanism of feature learning in convolutional neural networks",
arXiv 2309.00570).
"""

__version__ = "0.1.0"

from ray_convrfm.kernels.kernel import conv_ntk  # noqa: E402
from ray_convrfm.models.convrfm import ConvRFM  # noqa: E402
from ray_convrfm.models.deep import DeepConvRFM  # noqa: E402
from ray_convrfm.options import ComputeOptions  # noqa: E402

__all__ = ["ComputeOptions", "ConvRFM", "DeepConvRFM", "conv_ntk", "__version__"]
