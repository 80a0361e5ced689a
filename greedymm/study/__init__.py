"""Many runs as one study (paper Sec. 6.2-6.3, Figs. 2, 4, 8, 9; SPEC Sec. 11): grids of settings expanded into
ordinary runs, executed locally, in worker processes or with Ray, recorded in runs.jsonl, and the studies' figures.
"""
from .executors import EXECUTORS, LocalExecutor, ProcessExecutor, RayExecutor, make_executor
from .figures import FIGURES, plot_cls_cur, plot_pair_kinds, plot_regularization, plot_sensitivity, summary_table
from .grid import PAIR_KINDS, Grid, RunSpec, Study, expand, log_space
from .presets import greedy_learner, paper_studies, regularization, sensitivity
from .records import append_record, execute_run, read_records, study_dir
from .runner import StudyResult, load_study, run_study
from .stats import cls_cur_correlations, cls_cur_population, spearman

__all__ = ["EXECUTORS", "FIGURES", "PAIR_KINDS", "Grid", "LocalExecutor", "ProcessExecutor", "RayExecutor", "RunSpec",
           "Study", "StudyResult", "append_record", "cls_cur_correlations", "cls_cur_population", "execute_run", "expand", "greedy_learner", "load_study",
           "log_space", "make_executor", "paper_studies", "plot_cls_cur", "plot_pair_kinds",
           "plot_regularization", "plot_sensitivity", "read_records", "regularization", "run_study", "sensitivity",
           "spearman", "summary_table", "study_dir"]
