"""``--regen-reference``: which reference transcript a run may rewrite.

The shared ``<test>.out`` files are the default release's; another build writes only
``<test>.<major>.<minor>.out``, and only where its text differs from the shared file,
so regenerating on an old or a development build never changes what the default
release is compared with.
"""

from __future__ import annotations

from pathlib import Path

from ..qemu import builds
from ..qemu.transcript import shared_reference_path, specific_reference_path

DEFAULT_VERSION = tuple(int(x) for x in builds.DEFAULT_RELEASE.split("."))[:2]


def regenerate(text: str, folder: Path, test_name: str, version: tuple[int, ...]) -> Path | None:
    """Write ``text`` as the reference of ``test_name`` on a build of ``version``;
    returns the file written (None where the shared file already says the same)."""
    shared = shared_reference_path(folder, test_name)
    specific = specific_reference_path(folder, test_name, version)
    if tuple(version[:2]) == DEFAULT_VERSION and not specific.exists():
        target = shared
    elif shared.exists() and shared.read_text() == text:
        specific.unlink(missing_ok=True)  # the build now agrees with the shared file
        return None
    else:
        target = specific
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
