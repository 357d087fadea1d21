"""``python -m jlora.cli ...`` is the `jlora` command."""

import sys

from jlora.cli.main import main

sys.exit(main())
