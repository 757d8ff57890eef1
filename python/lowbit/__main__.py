"""``python -m lowbit ...`` is the ``lowbit`` command."""
import sys

from .cli import main

sys.exit(main())
