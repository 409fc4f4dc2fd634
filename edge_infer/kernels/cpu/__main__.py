"""Build the CPU attention kernel now (``python -m edge_infer.kernels.cpu``), so that the
first model run does not wait for it."""

from __future__ import annotations

import sys

from edge_infer.kernels.cpu import enabled, kernel_dir, load


def main() -> int:
    if not enabled():
        print("CPU attention kernel: turned off (EDGE_INFER_KERNELS)")
        return 0
    module = load()
    if module is None:
        print("CPU attention kernel: not available here; the plain-torch path will be used")
        return 0
    print(f"CPU attention kernel: ready ({kernel_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
