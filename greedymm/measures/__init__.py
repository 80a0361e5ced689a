"""What is measured (SPEC Sec. 4, 7, 11 and 13): accuracies, the conditional learning speed, the conditional
utilization rate, the sparsity, and the modality measures (`contribution`: Shapley, probes, robustness)."""
from .cls import CLS_GROUPS, CLSTracker
from .cur import compute_cut_means, compute_squeeze_means, conditional_utilization, utilization_rates
from .evaluate import evaluate, is_two_branch, model_input
from .sparsity import l1_norm, sparsity

__all__ = ["CLS_GROUPS", "CLSTracker", "compute_cut_means", "compute_squeeze_means", "conditional_utilization",
           "evaluate", "is_two_branch", "l1_norm", "model_input", "sparsity", "utilization_rates"]
