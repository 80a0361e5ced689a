"""How a model is trained (paper Sec. 5, 6.4; SPEC Sec. 5, 9 and 12): one module per method, each registered by name
(`python -m greedymm list` shows them). Importing this package registers the built-in methods."""
from .base import (Method, MethodSettings, Rebalancing, RebalancingSettings, StepContext, Sweep, get_method,
                   make_method, method_color, method_names, methods, register, setting, unregister)
from . import unimodal, vanilla, rubi, random, guided, ogm_ge, gblend, mmpareto, opm, pmr, agm  # noqa: F401,E402  (registers them)

__all__ = ["Method", "MethodSettings", "Rebalancing", "RebalancingSettings", "StepContext", "Sweep", "get_method",
           "make_method", "method_color", "method_names", "methods", "register", "setting", "unregister"]
