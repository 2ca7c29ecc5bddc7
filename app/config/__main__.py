import sys

from app.config.cli import main

sys.exit(main(sys.argv[1:]))
