"""``python -m samestyle`` is the ``samestyle`` command."""

import sys

from samestyle.streams.cli.main import main

sys.exit(main())
