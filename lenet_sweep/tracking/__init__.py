"""MLflow, both ways: store.py (where runs go and how to find them again), runs.py (what a run records and
how it ends), artifacts.py (reading back what runs recorded: configs, histories, files), one reader shared
by sweep, best and report."""
