"""The study system: Ray Tune trainables, schedulers, studies, logging and results.

This is the only package that imports ray and optuna; ``import ctt`` works without them.
"""
