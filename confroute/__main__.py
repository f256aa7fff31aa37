import sys

from confroute.cli import main

sys.exit(main())
