"""`python cli.py ...` does the same as `rdonnx ...`."""

import sys

from rdonnx.cli import main

if __name__ == "__main__":
    sys.exit(main())
