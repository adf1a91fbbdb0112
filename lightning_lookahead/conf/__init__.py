"""Hydra configs shipped with the package; compose them with ``hydra.searchpath=[pkg://lightning_lookahead.conf]``.

``callbacks/lookahead/`` is a config group for the ``lookahead`` entry of the ``callbacks`` node (``default``,
``snoo``, ``diloco_outer``, ``none``): ``callbacks/lookahead=snoo`` swaps that entry and keeps the app's other
callbacks. ``callbacks/*.yaml`` are whole ``callbacks`` nodes: ``lookahead`` (Lookahead alone), and ``snoo``,
``diloco_outer``, ``no_lookahead`` (the app's callbacks/default.yaml with the entry swapped). See docs/hydra.md.
"""
