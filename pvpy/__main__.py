import sys

from pvpy.cli import main

sys.exit(main())
