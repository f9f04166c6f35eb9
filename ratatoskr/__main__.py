import sys

from ratatoskr.cli import main

sys.exit(main())
