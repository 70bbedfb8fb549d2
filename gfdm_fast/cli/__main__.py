import sys

from gfdm_fast.cli import main

sys.exit(main())
