"""``python -m sshwrap``: the drop-in ssh command."""

import sys

from .cli import main

sys.exit(main())
