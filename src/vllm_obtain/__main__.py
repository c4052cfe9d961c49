import sys

from vllm_obtain.cli import main

if __name__ == "__main__":
    sys.exit(main())
