"""How a model is trained (paper Sec. 5, 6.4; SPEC Sec. 5, 9 and 12): one module per method, each registered by name
(`python -m greedymm list` shows them). Importing this package registers the built-in methods."""
from .base import (Method, MethodSettings, Rebalancing, RebalancingSettings, StepContext, Sweep, get_method,
                   make_method, method_color, method_names, methods, register, setting, unregister)
# Importing the built-in methods registers them (the field's balancers after the paper's and SPEC Sec. 12's).
from . import unimodal, vanilla, rubi, random, guided, ogm_ge, gblend  # noqa: F401,E402
from . import mmpareto, opm, pmr, agm  # noqa: F401,E402

__all__ = ["Method", "MethodSettings", "Rebalancing", "RebalancingSettings", "StepContext", "Sweep", "get_method",
           "make_method", "method_color", "method_names", "methods", "register", "setting", "unregister"]
