"""One table (paper Sec. 6.4, Table 1; SPEC Sec. 6-10): runs (`runs.py`), the summary and the paper's numbers
(`table.py`), the notebooks' settings (`params.py`) and the whole table for the notebook and the command
(`pipeline.py`). Import those modules; this package imports nothing itself (the studies import `runs`)."""
