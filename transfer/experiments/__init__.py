"""Experiment tooling over runs: sweep jobs and reports, Optuna search, the lr range test, residual-block analysis."""
