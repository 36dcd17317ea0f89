"""The runtime's internals: everything ``server.py`` runs that is not the application.

One module per idea (``server.py``'s docstring lists them). Areas in ``handlers/`` never import
this package: what they may use is the contract, ``handlers/_*.py``. Modules here import the
standard library, the contract and each other, never ``server``.
"""
