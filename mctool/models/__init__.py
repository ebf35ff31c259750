"""Networks: spec and flat layout, the ConvNet, the cross-architecture zoo, building."""

from mctool.models.build import CONVNET_VARIANTS, build_model, layout_of, model_names, spec_for
from mctool.models.convnet import ConvNet
from mctool.models.spec import (Layout, ModelSpec, default_depth, layer_sizes, layout_from_json, layout_json,
                                param_layout)

__all__ = ["CONVNET_VARIANTS", "ConvNet", "Layout", "ModelSpec", "build_model", "default_depth", "layer_sizes", "layout_of",
           "layout_from_json", "layout_json", "model_names", "param_layout", "spec_for"]
