#!/usr/bin/env python3
"""Benchmark harness: ``python benchmarks/harness.py [SPEC] [options]`` is ``moec bench``.

The timing code lives in ``moec.cli.bench`` so that the installed ``moec`` command has it; this
script only forwards its arguments, for running from a checkout.
"""

import sys

from moec.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
