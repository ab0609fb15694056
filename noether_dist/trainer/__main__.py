"""``python -m noether_dist.trainer --config FILE [key=value ...]``: run the reference trainer."""
import sys

from .run import main

sys.exit(main())
