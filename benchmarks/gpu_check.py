"""The GPU check's command (docs/gpu_check.md): `python benchmarks/gpu_check.py --help`. The code is the package
benchmarks/gpu_check/, which `import gpu_check` finds here before this file (a package comes first)."""

import sys

from gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
