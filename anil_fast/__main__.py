import sys

from anil_fast.cli import main

sys.exit(main())
