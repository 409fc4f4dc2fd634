"""Build the CPU kernels now (``python -m edge_infer.kernels.cpu``), so that the first model
run does not wait for them."""

from __future__ import annotations

import sys

from edge_infer.kernels.cpu import arch, enabled, kernel_dir, load


def main() -> int:
    if not enabled():
        print("CPU kernels: turned off (EDGE_INFER_KERNELS)")
        return 0
    module = load()
    if module is None:
        print("CPU kernels: not available here; the plain-torch path will be used")
        return 0
    print(f"CPU kernels: ready for {arch()} ({module.isa()}, {kernel_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
