import sys

from taskres.cli import main

sys.exit(main())
