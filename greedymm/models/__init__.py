"""What is trained (SPEC Sec. 2-3, 9-10, 13): the MMTM and its fusion modes, the two-branch, late-fusion and uni-modal
networks, the fusions by name, and the zoo of branches and models by name."""
from .mmtm import MMTM, FusionMode, SqueezeExcite, mmtm_hidden
from .two_branch import TwoBranchNet, UniModalNet, final_linear, strip_final_linear
from .late_fusion import LateFusionNet
from .fusions import FusionSpec, as_fusion, fusion_names, get_fusion, model_fusion
from .zoo import (build_model, build_two_branch, conv_branch, digit_branch, mmtm_convnet, mmtm_digits,
                  mmtm_resnet18, model_factory, resnet18_branch)

__all__ = ["MMTM", "FusionMode", "FusionSpec", "LateFusionNet", "SqueezeExcite", "TwoBranchNet", "UniModalNet",
           "as_fusion", "build_model", "build_two_branch", "conv_branch", "digit_branch", "final_linear",
           "fusion_names", "get_fusion", "mmtm_convnet", "mmtm_digits", "mmtm_hidden", "mmtm_resnet18",
           "model_factory", "model_fusion", "resnet18_branch", "strip_final_linear"]
