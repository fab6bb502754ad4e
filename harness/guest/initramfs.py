"""Build the guest's initramfs: busybox, our init, and the disk driver modules.

The archive is a gzip'ed "newc" cpio written here in pure Python (no cpio binary, no
root: device nodes and ownership exist only in the archive headers).  Debian ships no
``modules.dep`` in its kernel package, so module dependencies come from the
``depends=`` field of each module's ``.modinfo`` ELF section; init loads them from a
list in dependency order.  Results are cached by a hash of every input.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..qemu.cache import cache_root
from .kernel import GuestKernel, ZstdFailed, zstd_decompress

INIT_SCRIPT = Path(__file__).with_name("init.sh")
# The awk program init runs on the kernel log after the plan (see init.sh).
KMSG_AWK = Path(__file__).with_name("kmsg.awk")
KMSG_AWK_PATH = "etc/cbw/kmsg.awk"  # in the archive
# Bump when the archive layout changes, so cached archives are rebuilt.
LAYOUT_VERSION = 2
# Modules init must load (besides their dependencies) to see a disk of each kind.
DISK_MODULES: dict[str, tuple[str, ...]] = {
    "virtio-blk": ("virtio_blk",),
    "virtio-scsi": ("virtio_scsi", "sd_mod"),
    "ahci": ("ahci", "sd_mod"),
}
MODULE_LIST = "etc/cbw/modules"  # in the archive: one .ko path per line, load order
_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")


# --------------------------------------------------------------------------- cpio

@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive (as written or read back)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    ino: int = 0


class NewcWriter:
    """Accumulates a newc ("070701") cpio archive in memory, deterministically.

    All members are owned by root with mtime 0, so equal inputs give equal bytes.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0
        self._closed = False

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """A directory (parents are not implied: add them first)."""
        self._add(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with ``data`` as contents."""
        self._add(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        """A symbolic link ``name -> target``."""
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node (created by the kernel when it unpacks the archive)."""
        self._add(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive bytes, with the TRAILER!!! member; the writer is then closed."""
        if not self._closed:
            self._chunks.append(_newc_member("TRAILER!!!", 0, 0, b"", 1, (0, 0)))
            self._closed = True
        return b"".join(self._chunks)

    def _add(self, name: str, mode: int, data: bytes, nlink: int = 1,
             rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("archive already finished")
        self._ino += 1
        self._chunks.append(_newc_member(name.lstrip("/"), self._ino, mode, data, nlink, rdev))


def _newc_member(name: str, ino: int, mode: int, data: bytes, nlink: int,
                 rdev: tuple[int, int]) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    # The header+name and the data are each padded to a multiple of 4 bytes.
    return header + raw_name + _pad(len(header) + len(raw_name)) + data + _pad(len(data))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive (uncompressed) back into entries; stops at TRAILER!!!."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if archive[pos:pos + 6] != b"070701":
            raise ValueError(f"bad newc magic at offset {pos}: {archive[pos:pos + 6]!r}")
        f = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, size, rmaj, rmin, namesize = f[0], f[1], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start:data_start + size]
        if len(data) != size:
            raise ValueError(f"truncated member {name!r}")
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, data, (rmaj, rmin), ino))


# ------------------------------------------------------------------------ modules

@dataclass(frozen=True)
class Module:
    """A kernel module resolved for the initramfs: its name, source file, ELF bytes."""

    name: str
    source: Path
    data: bytes


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value pairs of an (uncompressed) module's ``.modinfo`` section."""
    section = _elf_section(elf, ".modinfo")
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode("ascii", "replace"), []).append(
                value.decode("utf-8", "replace"))
    return info


def module_depends(elf: bytes) -> list[str]:
    """Names of the modules this one needs loaded first (its ``depends=`` field)."""
    return [d for v in modinfo(elf).get("depends", []) for d in v.split(",") if d]


def _elf_section(elf: bytes, wanted: str) -> bytes:
    if elf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    is64 = elf[4] == 2
    end = "<" if elf[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)
        shdr = end + "IIQQQQ"  # name, type, flags, addr, offset, size
    else:
        shoff, = struct.unpack_from(end + "I", elf, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x2E)
        shdr = end + "IIIIII"
    sections = [struct.unpack_from(shdr, elf, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx]
    strtab = elf[names[4]:names[4] + names[5]]
    for name_off, _type, _flags, _addr, offset, size in sections:
        if strtab[name_off:strtab.index(b"\0", name_off)].decode() == wanted:
            return elf[offset:offset + size]
    raise ValueError(f"no {wanted} section")


def normalize(name: str) -> str:
    """The kernel's canonical module name ('-' and '_' are interchangeable)."""
    return name.replace("-", "_")


class ModuleTree:
    """Modules of one kernel, looked up by name (Debian ships no modules.dep)."""

    def __init__(self, kernel: GuestKernel):
        if kernel.modules_dir is None:
            raise ConfigError(f"kernel {kernel.version} was given without a modules directory, so "
                              "no module can be loaded: pass modules=[] if its disk drivers are "
                              "built in, or give its lib/modules/<version>")
        self.kernel = kernel
        self.root = kernel.modules_dir
        self.paths = self._index(self.root)
        self.builtin = self._builtin(self.root)

    @staticmethod
    def _index(root: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        # depmod's default search order: updates/ beats the stock kernel/ tree.
        for sub in ("kernel", "extra", "updates"):
            for dirpath, _dirs, files in os.walk(root / sub):
                for f in files:
                    for suffix in _SUFFIXES:
                        if f.endswith(suffix):
                            paths[normalize(f[:-len(suffix)])] = Path(dirpath, f)
                            break
        return paths

    @staticmethod
    def _builtin(root: Path) -> set[str]:
        try:
            lines = (root / "modules.builtin").read_text().split()
        except OSError:
            return set()
        return {normalize(Path(line).name.removesuffix(".ko")) for line in lines}

    def resolve(self, names: Iterable[str]) -> list[Module]:
        """``names`` and their dependencies, dependencies first; built-in ones are skipped."""
        order: list[Module] = []
        state: dict[str, str] = {}

        def visit(name: str, needed_by: tuple[str, ...]) -> None:
            n = normalize(name)
            if state.get(n) == "done" or n in self.builtin:
                return
            if state.get(n) == "visiting":
                raise ConfigError(f"kernel {self.kernel.version}: module dependency cycle "
                                  f"{' -> '.join((*needed_by, n))}: use another kernel")
            path = self.paths.get(n)
            if path is None:
                via = f" (needed by {needed_by[-1]})" if needed_by else ""
                raise ConfigError(f"kernel {self.kernel.version} has no module {n}{via} under "
                                  f"{self.root}: use a kernel that has it, or drop that disk type")
            data = load_module(path)
            state[n] = "visiting"
            try:
                deps = module_depends(data)
            except (ValueError, struct.error, IndexError) as e:
                raise ConfigError(f"{path} is not a valid kernel module ({e}): "
                                  f"reinstall kernel {self.kernel.version}") from None
            for dep in deps:
                visit(dep, (*needed_by, n))
            state[n] = "done"
            order.append(Module(n, path, data))

        for name in names:
            visit(name, ())
        return order


def load_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed (xz, gzip or zstd)."""
    raw = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise ConfigError(f"cannot decompress kernel module {path}: {e}") from None
    if path.name.endswith(".zst"):
        try:
            return zstd_decompress(raw)
        except ZstdFailed as e:
            raise ConfigError(f"cannot decompress kernel module {path}: {e}") from None
    return raw


# ---------------------------------------------------------------------- archive

def build_initramfs(kernel: GuestKernel, busybox: Path, modules: Sequence[str],
                    out_dir: Path | None = None) -> Path:
    """The guest initramfs (gzip'ed newc cpio) for ``kernel``, built once per input set.

    ``modules`` are module names (e.g. ``DISK_MODULES["ahci"]``); their dependencies
    are added and loaded first.  The archive is cached under ``out_dir`` (default
    ``<cache>/guest/initramfs``) named by a hash of all inputs.
    """
    if not busybox.is_file():
        raise ConfigError(f"busybox binary {busybox} does not exist: pass a static busybox")
    resolved = ModuleTree(kernel).resolve(modules) if modules else []
    bb = busybox.read_bytes()
    init = INIT_SCRIPT.read_bytes()
    awk = KMSG_AWK.read_bytes()
    key = _input_hash(kernel.version, bb, init, awk, resolved)
    out_dir = out_dir or cache_root() / "guest" / "initramfs"
    target = out_dir / f"{key}.cpio.gz"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = gzip.compress(_archive(kernel.version, bb, init, awk, resolved), compresslevel=6,
                            mtime=0)
    tmp = out_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_bytes(archive)
    os.replace(tmp, target)  # atomic: concurrent builders write identical bytes
    return target


def _input_hash(version: str, busybox: bytes, init: bytes, awk: bytes,
                modules: list[Module]) -> str:
    h = hashlib.sha256(json.dumps({
        "layout": LAYOUT_VERSION,
        "kernel": version,
        "busybox": hashlib.sha256(busybox).hexdigest(),
        "init": hashlib.sha256(init).hexdigest(),
        "kmsg_awk": hashlib.sha256(awk).hexdigest(),
        "modules": [[m.name, hashlib.sha256(m.data).hexdigest()] for m in modules],
    }, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _archive(version: str, busybox: bytes, init: bytes, awk: bytes,
             modules: list[Module]) -> bytes:
    w = NewcWriter()
    for d in ("bin", "dev", "proc", "sys", "etc", "etc/cbw", "lib", "lib/modules",
              f"lib/modules/{version}"):
        w.add_dir(d)
    w.add_dir("tmp", 0o1777)
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    w.add_chardev("dev/console", 5, 1)
    w.add_file("bin/busybox", busybox, 0o755)
    w.add_symlink("bin/sh", "busybox")  # init installs the other applet links itself
    w.add_file("init", init, 0o755)
    w.add_file(KMSG_AWK_PATH, awk)
    paths = []
    for m in modules:
        path = f"lib/modules/{version}/{m.name}.ko"
        w.add_file(path, m.data)
        paths.append("/" + path)
    w.add_file(MODULE_LIST, "".join(p + "\n" for p in paths).encode())
    return w.finish()
