"""A node exported over NBD, read by the build's own ``qemu-io`` as a pull-backup client.

The server listens on an *abstract* unix socket: no file, so no path-length limit
however deep the test's folder, and nothing to clean up.  The socket's name is
random (abstract names are global to the host) and filtered out of the transcript.
Each read is one ``qemu-io -r`` run, offline: its own NBD connection.

``nbd-server-start`` takes the legacy socket address, ``{"type": "unix", "data":
{...}}``; the NBD client (the ``nbd`` block driver) the flat one, ``server.path``.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from ..qemu.machine import Machine
from ..qemu.probe import BuildInfo
from ..qemu.qemu_io import QemuIoResult
from ..qemu.transcript import Transcript
from .images import Images


class NbdExport:
    """One node exported read-only as ``name`` on a fresh NBD server of ``vm``."""

    def __init__(self, vm: Machine, info: BuildInfo, images: Images, transcript: Transcript,
                 *, node: str, name: str = "snapshot"):
        self.vm = vm
        self.images = images
        self.transcript = transcript
        self.node = node
        self.name = name
        self.legacy = not info.schema.has_command("block-export-add")
        self.socket = f"cbw-nbd-{os.getpid()}-{secrets.token_hex(6)}"
        transcript.add_filter(lambda text: text.replace(self.socket, "NBD_SOCKET"))

    def _qmp(self, command: str, args: dict[str, Any]) -> Any:
        return self.transcript.execute(self.vm, command, args)

    def start(self) -> None:
        self._qmp("nbd-server-start", {"addr": {"type": "unix", "data": {
            "path": self.socket, "abstract": True}}})
        if self.legacy:
            self._qmp("nbd-server-add", {"device": self.node, "name": self.name})
        else:
            self._qmp("block-export-add", {"type": "nbd", "id": self.name,
                                           "node-name": self.node, "name": self.name})

    def stop(self) -> None:
        """Remove the export (waiting until it is gone) and stop the server."""
        if self.legacy:
            self._qmp("nbd-server-remove", {"name": self.name})
        else:
            self._qmp("block-export-del", {"id": self.name})
            self.transcript.event(self.vm.wait_event("BLOCK_EXPORT_DELETED", {"id": self.name}))
        self._qmp("nbd-server-stop", {})

    @property
    def image_opts(self) -> str:
        return (f"driver=nbd,server.type=unix,server.path={self.socket},server.abstract=on,"
                f"export={self.name}")

    def read(self, offset: int, length: int, pattern: int) -> QemuIoResult:
        """One client connection: ``read -P pattern offset length``, logged."""
        command = f"read -P {pattern:#x} {offset} {length}"
        result = self.images.qemu_io_on(["-r", "--image-opts", self.image_opts], command,
                                        what=f"NBD client read at {offset}")
        self.transcript.log(f"NBD client read at {offset}: {result.output}")
        return result

    def read_data(self, offset: int, length: int) -> tuple[QemuIoResult, bytes | None]:
        """One client connection: ``read -v offset length``; the bytes read (None if the
        read failed).  The dump is not logged: only its verdict is."""
        result = self.images.qemu_io_on(["-r", "--image-opts", self.image_opts],
                                        f"read -v {offset} {length}",
                                        what=f"NBD client read at {offset}")
        data = result.dumped(offset, length)
        self.transcript.log(f"NBD client read at {offset}+{length}: "
                            f"{result.error or ('read' if data is not None else result.output)}")
        return result, data
