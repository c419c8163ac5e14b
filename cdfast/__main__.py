import sys

from cdfast.cli import main

sys.exit(main())
