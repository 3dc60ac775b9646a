"""Hyperparameter search over ordinary training runs (``twotower tune``), with Optuna.

The tuner owns nothing but the search: each trial is the config with the trial's
values set (the same dotted keys as ``--set``), trained by ``train_run`` into its own
run folder, and scored by its best validation metric; test is ranked once, for the
best trial. See ``docs/tuning.md``.

space.py   the search space: YAML of config keys -> float / int / categorical ranges,
           checked against the config before any trial starts
study.py   the study in SQLite (create, resume, retry interrupted trials), the
           objective with per-epoch pruning, trials in parallel threads, progress
report.py  what a finished tuning leaves: best.yaml, trials.csv, plots, and the best
           trial's test metrics
logs.py    each trial's log lines in its train.log, off the console and its progress bar
"""
