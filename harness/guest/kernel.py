"""Guest kernel and busybox for the tiny test guest, fetched from Debian and cached.

Both come from Debian packages, fetched with the harness's private apt
(:mod:`harness.debian`); only the one package that holds the kernel (or busybox) is
downloaded, not the whole closure of its metapackage.  Each unpacked package lives
under ``<cache>/guest/`` with a completion marker written last, and a small pointer
file per request names the directory to use, so a second call is a couple of
``stat`` calls and no network access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ProvisionError
from ..qemu import debian
from ..qemu.cache import apt_root, cache_root, locked

_zstandard: Any
try:
    import zstandard as _zstandard
except ImportError:  # a declared dependency; the zstd tool stands in where it is missing
    _zstandard = None

# The suites of the apt root shared with QEMU provisioning (<cache>/apt/trixie):
# PrivateApt writes its sources from them, so every user of a root must agree.
# The target picks trixie's own kernel, not a backport.
TRIXIE = debian.Suite(("trixie", "trixie-backports"), "trixie")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MARKER = ".complete"
# Packages that carry the kernel image or its modules: linux-image-<abi> for 6.x; in
# 7.x also the split linux-binary-<abi>, linux-modules-<abi>, linux-base-<abi>
# (<abi> starts with a digit, which keeps the unrelated "linux-base" out).
_KERNEL_PART = re.compile(r"^linux-(image|binary|modules|base)-\d")


@dataclass(frozen=True)
class GuestKernel:
    """A bootable x86-64 kernel and the modules built for it.

    ``modules_dir`` is ``.../lib/modules/<version>``; it is ``None`` only for a user
    kernel given without modules (its disk drivers must then be built in).
    """

    vmlinuz: Path
    version: str
    modules_dir: Path | None
    # The same kernel uncompressed, as an ELF with a PVH entry point: QEMU starts it
    # directly, skipping firmware real-mode setup and decompression (~0.8 s under TCG).
    pvh: Path | None = None

    @property
    def boot_image(self) -> Path:
        """What to pass to QEMU's ``-kernel``: the PVH ELF if there is one, else the bzImage."""
        return self.pvh or self.vmlinuz

    @classmethod
    def from_user(cls, vmlinuz: Path | str, modules_dir: Path | str | None = None, *,
                  pvh: bool = True) -> GuestKernel:
        """Use your own kernel; ``modules_dir`` is its ``lib/modules/<uname -r>`` directory.

        With ``pvh`` an uncompressed PVH image is extracted (and cached) if the
        kernel supports it, for a faster boot.
        """
        vmlinuz = Path(vmlinuz).expanduser()
        if not vmlinuz.is_file():
            raise ConfigError(f"guest kernel {vmlinuz} does not exist: pass the path of a "
                              "bzImage/vmlinuz")
        image_version = bzimage_version(vmlinuz)
        if modules_dir is None:
            if image_version is None:
                raise ConfigError(f"{vmlinuz} is not an x86 bzImage (no version in its header): "
                                  "pass a bzImage, or its modules directory too")
            return cls(vmlinuz.resolve(), image_version, None, pvh_image(vmlinuz) if pvh else None)
        modules_dir = Path(modules_dir).expanduser()
        if not (modules_dir / "kernel").is_dir():
            raise ConfigError(f"guest kernel modules directory {modules_dir} has no kernel/ "
                              "subdirectory: pass .../lib/modules/<uname -r> of that kernel")
        version = modules_dir.name
        if image_version is not None and image_version != version:
            raise ConfigError(f"{vmlinuz} is kernel {image_version} but {modules_dir} holds "
                              f"modules for {version}: pass the modules directory of the same "
                              "build")
        return cls(vmlinuz.resolve(), version, modules_dir.resolve(),
                   pvh_image(vmlinuz) if pvh else None)


def bzimage_version(vmlinuz: Path) -> str | None:
    """The ``uname -r`` string in an x86 bzImage's setup header, or None if not a bzImage."""
    # Boot protocol: "HdrS" at 0x202, kernel_version pointer (minus 0x200) at 0x20E.
    with open(vmlinuz, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    end = head.find(b"\0", ptr)
    if ptr >= len(head) or end < 0:
        return None
    words = head[ptr:end].decode("ascii", "replace").split()
    return words[0] if words else None


def provision_kernel(*, suite: debian.Suite = TRIXIE, package: str = KERNEL_METAPACKAGE,
                     refresh: bool = False, pvh: bool = True) -> GuestKernel:
    """Debian's kernel (default: trixie's cloud flavour), downloaded once and cached.

    With ``refresh`` the package lists are consulted again and a newer kernel, if
    any, is fetched; otherwise a cached kernel is reused without network access.
    With ``pvh`` its uncompressed PVH image is extracted too (see :func:`pvh_image`).
    """
    prefix = _provision(f"{suite.target}-{package}", suite, package, _KERNEL_PART.match,
                        _kernel_dir_name, refresh)
    kernel = _kernel_in(prefix)
    if pvh:
        kernel = dataclasses.replace(kernel, pvh=pvh_image(kernel.vmlinuz))
    return kernel


# Compressed payload formats of a bzImage, by magic number.
_XZ, _GZIP, _ZSTD = b"\xfd7zXZ\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_image(vmlinuz: Path) -> Path | None:
    """The kernel in ``vmlinuz`` (a bzImage) uncompressed, if it has a PVH entry point.

    Cached under ``<cache>/guest/pvh/`` by a hash of the bzImage.  Returns None
    (boot the bzImage instead) when the kernel lacks PVH support or its payload
    cannot be decompressed here (zstd: see :func:`zstd_decompress`).
    """
    data = vmlinuz.read_bytes()
    out = cache_root() / "guest" / "pvh" / (hashlib.sha256(data).hexdigest()[:32] + ".elf")
    if out.is_file():
        return out
    try:
        elf = _bzimage_payload(data)
    except _NoPVH as e:
        debian._say(f"guest kernel {vmlinuz.name} boots without PVH (~0.8 s slower): {e}")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic_bytes(out, elf)
    return out


class _NoPVH(Exception):
    pass


def _bzimage_payload(data: bytes) -> bytes:
    """Decompress a bzImage's payload and check it is an ELF with a PVH entry note."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or \
            int.from_bytes(data[0x206:0x208], "little") < 0x208:
        raise _NoPVH("not a bzImage of boot protocol >= 2.08")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    if payload.startswith(_XZ):
        elf = lzma.LZMADecompressor().decompress(payload)  # ignores the appended size
    elif payload.startswith(_GZIP):
        elf = zlib.decompressobj(wbits=31).decompress(payload)
    elif payload.startswith(_ZSTD):
        elf = _unzstd(payload)
    else:
        raise _NoPVH(f"its payload format (magic {payload[:4].hex()}) is not handled")
    if not _has_pvh_note(elf):
        raise _NoPVH("it has no PVH entry point (CONFIG_PVH)")
    return elf


def _unzstd(payload: bytes) -> bytes:
    # The kernel build appends the uncompressed size (4 bytes): not part of the frame.
    try:
        return zstd_decompress(payload[:-4])
    except ZstdFailed as e:
        raise _NoPVH(str(e)) from None


class ZstdFailed(Exception):
    """zstd data could not be decompressed (no decompressor here, or bad data)."""


def zstd_decompress(data: bytes) -> bytes:
    """Decompress one zstd frame: with the ``zstandard`` package (a dependency of the
    harness), else with the host's ``zstd`` tool; :class:`ZstdFailed` if neither can."""
    if _zstandard is not None:
        try:
            # Streamed: the kernel's frames do not record their size in the header.
            return bytes(_zstandard.ZstdDecompressor().decompressobj().decompress(data))
        except _zstandard.ZstdError as e:
            raise ZstdFailed(f"zstd data does not decompress: {e}") from None
    tool = shutil.which("zstd")
    if tool is None:
        raise ZstdFailed("the data is zstd-compressed and neither the zstandard Python "
                         "package nor the zstd tool is installed: pip install zstandard")
    proc = subprocess.run([tool, "-dcq"], input=data, capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise ZstdFailed(f"zstd failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _has_pvh_note(elf: bytes) -> bool:
    """True if a PT_NOTE segment holds a Xen PHYS32_ENTRY note (what QEMU's PVH boot needs)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def busybox_static(*, suite: debian.Suite = TRIXIE, refresh: bool = False) -> Path:
    """Path of Debian's statically linked busybox (package busybox-static), cached."""
    prefix = _provision(f"{suite.target}-{BUSYBOX_PACKAGE}", suite, BUSYBOX_PACKAGE,
                        lambda name: name == BUSYBOX_PACKAGE, _busybox_dir_name, refresh)
    binary = prefix / "usr/bin/busybox"
    if not binary.is_file():
        binary = prefix / "bin/busybox"
    if not binary.is_file():
        raise ProvisionError(f"no busybox binary in {prefix}: delete that directory and retry")
    return binary


def _kernel_in(prefix: Path) -> GuestKernel:
    modules = _modules_dirs(prefix)
    if len(modules) != 1:
        raise ProvisionError(f"expected one lib/modules/<version> in {prefix}, found "
                             f"{[m.name for m in modules]}: delete that directory and retry")
    version = modules[0].name
    candidates = [prefix / "boot" / f"vmlinuz-{version}", *sorted(prefix.rglob("vmlinuz*"))]
    vmlinuz = next((c for c in candidates if c.is_file()), None)
    if vmlinuz is None:
        raise ProvisionError(f"no vmlinuz for {version} in {prefix}: delete that directory "
                             "and retry")
    return GuestKernel(vmlinuz, version, modules[0])


def _modules_dirs(prefix: Path) -> list[Path]:
    found = []
    for base in ("usr/lib/modules", "lib/modules"):  # usr-merged or not
        if (prefix / base).is_dir():
            found += [d for d in (prefix / base).iterdir() if (d / "kernel").is_dir()]
    return found


def _kernel_dir_name(prefix: Path, _pkgs: list[tuple[str, str]]) -> str:
    return "kernel-" + _kernel_in(prefix).version


def _busybox_dir_name(_prefix: Path, pkgs: list[tuple[str, str]]) -> str:
    # The epoch ("1:") says nothing to a reader; drop it from the name.
    return "busybox-" + _safe(dict(pkgs)[BUSYBOX_PACKAGE].split(":", 1)[-1])


def _safe(text: str) -> str:
    """A package version as a directory name (no ':' epochs, no '/')."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _provision(key: str, suite: debian.Suite, package: str, want: Callable[[str], object],
               dir_name: Callable[[Path, list[tuple[str, str]]], str], refresh: bool) -> Path:
    """Unpack the packages of ``package``'s closure selected by ``want``; return the prefix."""
    guest = cache_root() / "guest"
    pointer = guest / f"{key}.json"
    if not refresh and (hit := _cached(guest, pointer)) is not None:
        return hit
    guest.mkdir(parents=True, exist_ok=True)
    with locked(guest, "the guest cache"):
        if not refresh and (hit := _cached(guest, pointer)) is not None:
            return hit  # another process provisioned it while we waited
        root = apt_root(suite)
        with locked(root, "the package cache"):
            apt = debian.PrivateApt(root, suite.suites)
            closure = apt.resolve([package], suite.target)
            pinned = [(n, v) for n, v in closure if want(n)]
            if not pinned:
                raise ProvisionError(f"{package} from {suite.target} pulls no package holding "
                                     f"what we need (got {[n for n, _ in closure]}): "
                                     "pass another package or use GuestKernel.from_user")
            debs = apt.download(pinned)
        prefix = _unpack_new(guest, debs, pinned, dir_name)
        _write_atomic(pointer, json.dumps({"dir": prefix.name, "packages": pinned}))
        return prefix


def _cached(guest: Path, pointer: Path) -> Path | None:
    try:
        prefix = guest / json.loads(pointer.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prefix if (prefix / MARKER).is_file() else None


def _unpack_new(guest: Path, debs: list[Path], pinned: list[tuple[str, str]],
                dir_name: Callable[[Path, list[tuple[str, str]]], str]) -> Path:
    """Unpack into a scratch directory, then move it to its final name, marker last."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=guest))
    try:
        debian.unpack(debs, tmp)
        final = guest / dir_name(tmp, pinned)
        if (final / MARKER).is_file():
            return final  # same packages already there (e.g. refresh found nothing new)
        if final.exists():
            shutil.rmtree(final)  # an interrupted earlier attempt
        os.rename(tmp, final)
        (final / MARKER).write_text(json.dumps({"packages": pinned}))
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    _write_atomic_bytes(path, text.encode())


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write via a private temporary name, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


