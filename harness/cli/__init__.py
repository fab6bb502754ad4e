"""Command lines across builds: the matrix, the behaviour diff, ``bisect-step``.

``python -m harness matrix|diff|bisect-step ...`` (see :mod:`harness.__main__`).  Each
command runs pytest with the plugin in a subprocess per build and reads the
``results.json`` it leaves (:mod:`harness.plugin.results`).
"""
