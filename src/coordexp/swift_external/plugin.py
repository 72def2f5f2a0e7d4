"""Entry file for ``swift sft --external_plugins``.

ms-swift imports plugin files by path and puts their folder first on ``sys.path``; this file
sits alone in its folder so that nothing of the package (``io.py``, ``eval/``...) can shadow a
standard module. It only registers :mod:`coordexp.swift_plugin`.
"""

from coordexp.swift_plugin import register

register()
