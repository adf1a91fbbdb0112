"""Hydra configs shipped with the package; compose them with ``hydra.searchpath=[pkg://lightning_lookahead.conf]``.

One folder per Hydra config group (``callbacks/``: one file per callback, ``callbacks=<file name>``).
"""
