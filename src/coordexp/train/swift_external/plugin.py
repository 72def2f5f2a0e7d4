"""Entry file for ``swift sft --external_plugins``.

ms-swift imports plugin files by path and puts their folder first on ``sys.path``; this file
sits alone in its folder so that no module of the package (``loss.py``, ``trainer.py``...) can
shadow a module of the same name elsewhere. It only registers :mod:`coordexp.train.swift_plugin`.
"""

from coordexp.train.swift_plugin import register

register()
