"""The ``moec`` command line: ``moec inspect`` and ``moec bench`` (see ``moec.cli.main``).

Also runnable as ``python -m moec.cli``.
"""
