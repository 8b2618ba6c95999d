"""iTPN: Integrally Pre-Trained Transformer Pyramid Networks (Tian et al., CVPR 2023).

Importing the package registers every model variant with timm
(``timm.create_model("itpn_base_patch16_224")``).
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the variants with timm)
