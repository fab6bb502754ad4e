"""Disk images, offline: raw ones as the plain files they are, others with the build's tools.

A raw image's bytes are the guest's bytes, so creating, filling and checking one is
exact in Python, without a process per step; qcow2 (and any other format) goes
through the build's own ``qemu-img`` and ``qemu-io``.

Every image created or written is recorded, in order, in ``images.jsonl`` in the
folder (one JSON object a line: ``create``, ``fill``, ``copy``, with paths relative
to the folder), so that a replay script can remake the images a QEMU saw.  Offline
reads are not recorded.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import HarnessError
from ..qemu.builds import QemuBuild
from ..qemu.qemu_io import QemuIoResult

TOOL_TIMEOUT = 60.0
RECIPE = "images.jsonl"
_BLOCK = 1 << 20  # bytes read or written at a time
_SIZE = re.compile(r"^(\d+)([kKMGT]?)$")
_UNITS = {"": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@functools.lru_cache(maxsize=4)  # bytes are immutable; a family of tests shares one seed
def seeded_bytes(seed: int, length: int) -> bytes:
    """Pseudo-random data, the same for a seed on every run: contents in which a byte read
    from the wrong offset shows (``replay.py`` remakes it the same way)."""
    return random.Random(seed).randbytes(length)


@functools.lru_cache(maxsize=4)
def pattern_bytes(pattern: int, length: int) -> bytes:
    """``length`` bytes of the byte ``pattern`` (what :meth:`Images.write` fills)."""
    return bytes([pattern]) * length


class ImageError(HarnessError):
    """An image could not be created, written or read."""


def byte_count(size: int | str) -> int:
    """``65536``, ``"64k"``, ``"4M"`` (qemu-img's binary suffixes) in bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size.strip())
    if not m:
        raise ImageError(f"size {size!r}: use a number of bytes or one with k, M, G or T")
    return int(m.group(1)) * _UNITS[m.group(2)]


class Images:
    """Create images, write patterns and check data in one folder."""

    def __init__(self, build: QemuBuild, folder: Path):
        self.build = build
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def recipe(self) -> Path:
        """The JSON-lines record of every image created or written, in order."""
        return self.folder / RECIPE

    def _record(self, op: str, **fields: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.recipe, "a") as out:
            out.write(json.dumps({"op": op, **fields}) + "\n")

    def _name(self, path: Path) -> str:
        """``path`` relative to the folder (absolute if it lies outside)."""
        path = Path(path)
        return str(path.relative_to(self.folder)) if path.is_relative_to(self.folder) \
            else str(path)

    def _run(self, argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True,
                                  timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ImageError(f"{what}: no answer within {TOOL_TIMEOUT:g}s: {' '.join(argv)}") \
                from None
        return proc

    # ------------------------------------------------------------ writing
    def create(self, name: str, size: str | int, fmt: str = "qcow2",
               options: Sequence[str] = ()) -> Path:
        """A new image of ``size`` bytes (zeros); raw without options is a sparse file."""
        path = self.path(name)
        nbytes = byte_count(size)
        if fmt == "raw" and not options:
            try:
                with open(path, "wb") as f:
                    f.truncate(nbytes)
            except OSError as exc:
                raise ImageError(f"creating {name} failed: {exc.strerror}") from None
        else:
            argv = [str(self.build.qemu_img), "create", "-q", "-f", fmt,
                    *[x for o in options for x in ("-o", o)], str(path), str(nbytes)]
            proc = self._run(argv, f"create {name}")
            if proc.returncode != 0:
                raise ImageError(f"qemu-img create {name} failed: {proc.stderr.strip()}")
        self._record("create", path=self._name(path), size=nbytes, format=fmt,
                     options=list(options))
        return path

    def write(self, path: Path, pattern: int, offset: int | str, length: int | str,
              fmt: str = "qcow2") -> None:
        """Fill ``length`` bytes at ``offset`` with the byte ``pattern``."""
        start, nbytes = byte_count(offset), byte_count(length)
        if fmt == "raw":
            try:
                with open(path, "r+b") as f:
                    f.seek(start)
                    block = bytes([pattern]) * min(nbytes, _BLOCK)
                    for done in range(0, nbytes, _BLOCK):
                        f.write(block[:min(_BLOCK, nbytes - done)])
            except OSError as exc:
                raise ImageError(f"writing pattern {pattern:#x} to {Path(path).name} failed: "
                                 f"{exc.strerror}") from None
        else:
            result = self.qemu_io(path, f"write -P {pattern:#x} {start} {nbytes}", fmt=fmt)
            if not result.ok:
                raise ImageError(f"writing pattern {pattern:#x} to {Path(path).name} failed: "
                                 f"{result.error}")
        self._record("fill", path=self._name(path), offset=start, length=nbytes,
                     pattern=pattern)

    def fill_seeded(self, path: Path, seed: int, offset: int, length: int) -> bytes:
        """Fill a raw image's range with :func:`seeded_bytes`; returns them."""
        data = seeded_bytes(seed, length)
        try:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(data)
        except OSError as exc:
            raise ImageError(f"writing seeded data to {Path(path).name} failed: "
                             f"{exc.strerror}") from None
        self._record("fill-seeded", path=self._name(path), offset=offset, length=length,
                     seed=seed)
        return data

    def read_raw(self, path: Path, offset: int = 0, length: int | None = None) -> bytes:
        """A raw image's bytes (the whole image without ``length``)."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise ImageError(f"reading {Path(path).name} failed: {exc.strerror}") from None

    def copy(self, source: Path, dest: Path) -> Path:
        """A byte-for-byte copy of an image file (e.g. a point-in-time reference)."""
        shutil.copyfile(source, dest)
        self._record("copy", **{"from": self._name(source), "to": self._name(dest)})
        return Path(dest)

    # ------------------------------------------------------------ reading
    def holds(self, path: Path, pattern: int, offset: int | str, length: int | str,
              fmt: str = "qcow2", force_share: bool = False) -> bool:
        """True if every byte of the range reads as ``pattern``."""
        if fmt == "raw":
            return self.holds_each(path, pattern, [byte_count(offset)], byte_count(length),
                                   fmt)[byte_count(offset)]
        result = self.qemu_io(path, f"read -P {pattern:#x} {offset} {length}", fmt=fmt,
                              force_share=force_share)
        if "Pattern verification failed" in result.output:
            return False
        if not result.ok:
            raise ImageError(f"reading {Path(path).name} at {offset} failed: {result.error}")
        return True

    def holds_each(self, path: Path, pattern: int, offsets: Sequence[int], length: int,
                   fmt: str = "qcow2") -> dict[int, bool]:
        """:meth:`holds` for several offsets in one pass (offsets must differ)."""
        if len(set(offsets)) != len(offsets):
            raise ValueError("holds_each() needs distinct offsets")
        if fmt == "raw":
            want = bytes([pattern]) * length
            out = {}
            try:
                with open(path, "rb") as f:
                    for off in offsets:
                        f.seek(off)
                        data = f.read(length)
                        if len(data) != length:
                            raise ImageError(f"reading {Path(path).name} at {off}: the image "
                                             f"ends before {off + length}")
                        out[off] = data == want
            except OSError as exc:
                raise ImageError(f"reading {Path(path).name} failed: {exc.strerror}") from None
            return out
        result = self.qemu_io(path, *(f"read -P {pattern:#x} {o} {length}" for o in offsets),
                              fmt=fmt)
        verdicts = result.pattern_reads(offsets)
        if verdicts is None:
            raise ImageError(f"reading {Path(path).name} failed: "
                             f"{result.error or result.output}")
        return verdicts

    def identical(self, a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
        """Same guest-visible content?  As ``qemu-img compare``: where one image is longer,
        its extra bytes must be zeros."""
        if fmt_a == fmt_b == "raw":
            try:
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    while True:
                        da, db = fa.read(_BLOCK), fb.read(_BLOCK)
                        if not da and not db:
                            return True
                        common = min(len(da), len(db))
                        if da[:common] != db[:common] or da[common:].strip(b"\0") or \
                                db[common:].strip(b"\0"):
                            return False
            except OSError as exc:
                raise ImageError(f"comparing {Path(a).name} with {Path(b).name} failed: "
                                 f"{exc.strerror}") from None
        proc = self._run([str(self.build.qemu_img), "compare", "-q", "-f", fmt_a, "-F", fmt_b,
                          str(a), str(b)], f"compare {Path(a).name} {Path(b).name}")
        if proc.returncode in (0, 1):
            return proc.returncode == 0
        raise ImageError(f"qemu-img compare {Path(a).name} {Path(b).name} failed: "
                         f"{proc.stderr.strip()}")

    def holds_data(self, path: Path, data: bytes) -> bool:
        """Does the raw image hold ``data`` from its start?  As :meth:`identical` against
        an image of those bytes, without writing one: where one is longer, its extra
        bytes must be zeros."""
        try:
            with open(path, "rb") as f:
                for at in range(0, len(data), _BLOCK):
                    want = data[at:at + _BLOCK]
                    held = f.read(len(want))
                    if held != want[:len(held)] or (len(held) < len(want) and
                                                    want[len(held):].strip(b"\0")):
                        return False
                while rest := f.read(_BLOCK):
                    if rest.strip(b"\0"):
                        return False
        except OSError as exc:
            raise ImageError(f"reading {Path(path).name} failed: {exc.strerror}") from None
        return True

    def map(self, path: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
        """``qemu-img map --output=json``: the image's extents (``start``, ``length``,
        ``depth`` in the backing chain, ``data``, ``zero``, ``compressed`` if the build
        says), offline."""
        proc = self._run([str(self.build.qemu_img), "map", "--output=json", "-f", fmt,
                          str(path)], f"map {Path(path).name}")
        if proc.returncode != 0:
            raise ImageError(f"qemu-img map {Path(path).name} failed: {proc.stderr.strip()}")
        extents: list[dict[str, Any]] = json.loads(proc.stdout)
        return extents

    # ------------------------------------------------------------ qemu-io
    def qemu_io(self, path: Path, *commands: str, fmt: str = "qcow2",
                force_share: bool = False) -> QemuIoResult:
        return self.qemu_io_on(["-f", fmt, *(["-U"] if force_share else []), str(path)],
                               *commands, what=f"qemu-io {Path(path).name}")

    def qemu_io_on(self, image: Sequence[str], *commands: str, what: str = "qemu-io"
                   ) -> QemuIoResult:
        """qemu-io on any image spec (``["-r", "--image-opts", "driver=nbd,..."]``)."""
        argv = [str(self.build.qemu_io)]
        for c in commands:
            argv += ["-c", c]
        proc = self._run([*argv, *image], what)
        return QemuIoResult("; ".join(commands), (proc.stdout + proc.stderr).strip())
