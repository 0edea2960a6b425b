"""The config's vocabulary, its typed form and its checks: ``spec`` (every key once, with its type
and default, as the frozen ``RunSpec`` the entry points resolve a preset into), ``options`` (every
enumerated value, listed once), ``checks`` (every problem of a spec that needs no data and no device
work, all reported at once). Imports nothing else from ``trainer`` except the mesh arithmetic of
``trainer.sharding`` (``tests/imports_test.py`` checks each package's layer).
"""
