#!/usr/bin/env python
"""`python run.py --mode dev|prod [options]`: the same as `vllm-obtain serve [options]`; other
commands pass through (`python run.py doctor` is `vllm-obtain doctor`)."""

import sys

from vllm_obtain.cli import main, with_default_command

if __name__ == "__main__":
    sys.exit(main(with_default_command(sys.argv[1:])))
