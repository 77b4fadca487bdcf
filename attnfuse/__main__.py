"""``python -m attnfuse ...``: the same as the ``attnfuse`` command."""
import sys

from .cli import main

sys.exit(main())
