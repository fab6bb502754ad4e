"""Command line: ``python -m harness.provision [RELEASE ...] [--kernel]``.

Fetches provisioned QEMU releases (and the guest kernel) into the cache ahead of a
test run, so downloads show their progress outside pytest's output capture.
"""

from __future__ import annotations

import argparse
import sys

from .errors import HarnessError
from .qemu import builds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.provision", description=__doc__)
    parser.add_argument("releases", nargs="*", default=[builds.DEFAULT_RELEASE],
                        help=f"QEMU releases to fetch: {', '.join(builds.RELEASES)} or 'all'")
    parser.add_argument("--kernel", action="store_true", help="also fetch the guest kernel")
    parser.add_argument("--no-qemu", action="store_true", help="fetch no QEMU release")
    args = parser.parse_args(argv)
    names = list(builds.RELEASES) if "all" in args.releases else args.releases
    if args.no_qemu:
        names = []
    try:
        for name in names:
            print(f"QEMU {name}: {builds.provision(name)}")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.kernel:
        from .guest import kernel
        try:
            print(f"guest kernel: {kernel.provision_kernel().vmlinuz}")
            print(f"guest busybox: {kernel.busybox_static()}")
        except HarnessError as exc:
            print(f"error: guest kernel: {exc}; bring your own (PYTEST_ARGS='--guest-kernel "
                  "bzImage'), or leave the guest tests out (PYTEST_ARGS='-m \"not guest\"')",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
