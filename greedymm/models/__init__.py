"""What is trained (SPEC Sec. 2-3, 9-10): the MMTM and its fusion modes, the two-branch and uni-modal networks, and
the zoo of branches and models by name."""
from .mmtm import MMTM, FusionMode, SqueezeExcite, mmtm_hidden
from .two_branch import TwoBranchNet, UniModalNet, final_linear
from .zoo import (build_two_branch, conv_branch, digit_branch, mmtm_convnet, mmtm_digits, mmtm_resnet18,
                  model_factory, resnet18_branch)

__all__ = ["MMTM", "FusionMode", "SqueezeExcite", "TwoBranchNet", "UniModalNet", "build_two_branch", "conv_branch",
           "digit_branch", "final_linear", "mmtm_convnet", "mmtm_digits", "mmtm_hidden", "mmtm_resnet18",
           "model_factory", "resnet18_branch"]
