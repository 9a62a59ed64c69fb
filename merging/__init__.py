"""coevo's weights layer: streaming safetensors I/O, compatibility checks, merge methods,
and applying a merge function to a base model and its experts tensor by tensor."""

from merging.apply import MergeOutputInvalid, MergeStats, merge_models
from merging.check import IncompatibleModels, check_compatible
from merging.io import ModelDirError, ModelWeights, open_weights, share_readable, write_weights
from merging.methods import METHODS, MergeFn, MethodSpec, make_merge_fn

__all__ = [
    "METHODS",
    "IncompatibleModels",
    "MergeFn",
    "MergeOutputInvalid",
    "MergeStats",
    "MethodSpec",
    "ModelDirError",
    "ModelWeights",
    "check_compatible",
    "make_merge_fn",
    "merge_models",
    "open_weights",
    "share_readable",
    "write_weights",
]
