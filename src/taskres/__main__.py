import sys

from taskres.app.cli import main

sys.exit(main())
