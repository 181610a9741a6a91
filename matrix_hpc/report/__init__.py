"""``matrix-hpc report``: a self-contained HTML report of an output directory.

Figures from the run's own timing columns (throughput, completions by
status over time, task latency, step latency per role, tokens per row,
turns per dialogue, the workflow's metrics), numbers from the code behind
``matrix-hpc inspect``. Only the needed columns are read (Parquet
projection) and aggregated with Arrow and numpy; matplotlib draws.

    from matrix_hpc.report.build import ReportInput, build_report
"""
