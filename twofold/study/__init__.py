"""Studies over many runs: grids of runs (`grid.py`, for `twofold compare` and `twofold bench`), statistics over
seeds (`stats.py`) and the report that reads run directories (`report.py`). Nothing here is imported by a
training run."""
