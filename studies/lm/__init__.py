"""Helpers of studies/lm_study.py: data (pydoc topics), model (a small GPT), report (tables, figure)."""
