#!/usr/bin/env python
"""`python run.py --mode dev|prod [options]`: the same as `vllm-obtain serve [options]`."""

import sys

from vllm_obtain.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in {"serve", "selftest", "models", "-h", "--help", "--version"}:
        args = ["serve", *args]
    sys.exit(main(args))
