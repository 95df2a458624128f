"""``python -m moec.cli``: the same as the ``moec`` command."""

import sys

from moec.cli.main import main

sys.exit(main())
