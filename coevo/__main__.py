import sys

from coevo.cli import main

if __name__ == "__main__":  # spawned worker processes (the zoo build's) import this module too
    sys.exit(main())
