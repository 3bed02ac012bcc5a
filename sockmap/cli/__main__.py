"""``python -m sockmap.cli``: the same as the ``sockmap`` command."""

import sys

from sockmap.cli.main import main

sys.exit(main())
