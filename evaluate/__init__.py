"""Metrics, threshold adjustment, ensembles, Easy/Difficult analysis and reports."""
