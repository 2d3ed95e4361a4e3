"""Stage 4, the runs: the grid runner, run records, metrics, tuning, plots and submissions."""
