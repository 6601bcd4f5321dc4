"""Image feature extractors writing VL-Adapter-style per-image HDF5 grid features.

- ``efficientnet-lite0``: offline, packaged ImageNet weights, [49, 1280].
- ``clip-rn101``: the paper's CLIP RN101 C5 grid, [49, 2048]; optional (``vlpet[clip]``).

Heavy modules (the encoders, h5py) are imported lazily.
"""

from ._image import IMAGE_EXTENSIONS, ImageReadError, ImageSourceError
from .efficientnet_lite0 import EfficientNetLite0, load_efficientnet_lite0, tf_same_padding
from .extract import (
    ENCODERS,
    EncoderSpec,
    ImageIdError,
    UnknownEncoderError,
    extract_features,
    feature_path,
    get_encoder_spec,
    is_valid_feature_file,
    read_features,
)
from .clip_rn101 import MissingOptionalDependency, load_clip_rn101

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "EfficientNetLite0",
    "IMAGE_EXTENSIONS",
    "ImageIdError",
    "ImageReadError",
    "ImageSourceError",
    "MissingOptionalDependency",
    "UnknownEncoderError",
    "extract_features",
    "feature_path",
    "get_encoder_spec",
    "is_valid_feature_file",
    "load_clip_rn101",
    "load_efficientnet_lite0",
    "read_features",
    "tf_same_padding",
]
