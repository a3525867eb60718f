"""Scaling analysis: load runs or published tables, derive scaling metrics, fit models, report.

Modules: :mod:`.runs` (the one place that knows the trainer's file format),
:mod:`.scaling` (metrics and fits), :mod:`.plots`, :mod:`.report` and :mod:`.cli`.
"""
