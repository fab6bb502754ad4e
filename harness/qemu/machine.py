"""One QEMU process, its whole life: launch, QMP, bounded waits, teardown.

Design points, each learnt the hard way:

* QMP runs over a socketpair passed as a file descriptor: no socket path, so no
  length limit and no connect race.
* Every wait races the operation against the process's exit (a pidfd) and a
  timeout; qemu.qmp alone would wait forever on a QEMU that died or hangs.
* QEMU runs in its own session (process group) with a parent-death signal, so it
  dies with the test process even if that is SIGKILLed, and teardown can kill the
  whole group.  A QEMU that livelocks ignores ``quit`` and SIGTERM: teardown ends
  with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from ..errors import (
    AbnormalShutdown,
    CommandFailed,
    LaunchFailure,
    QEMUDied,
    QEMUError,
    QEMUUnresponsive,
    WaitTimeout,
    describe_exit,
)
from .builds import QemuBuild
from .conversation import Conversation
from .qemu_io import QemuIoResult, abridged
from .reproducer import images_folder

T = TypeVar("T")

LAUNCH_TIMEOUT = 30.0
COMMAND_TIMEOUT = 20.0
EVENT_TIMEOUT = 30.0
QUIT_TIMEOUT = 3.0
MAX_KEPT_EVENTS = 10_000  # per event name: a flood of one cannot push out a rare one
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` where util-linux's ``setpriv`` has that option, else
    nothing (QEMU then gets its parent-death signal from :func:`_die_with_parent`).

    A ``preexec_fn`` makes Python fork the whole test process and run Python in the
    child: ~7 ms of CPU a launch, against ~1 ms for the spawn and setpriv's exec."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if ok else ()


@functools.cache
def supports_monitor_object(qemu_system: str) -> bool:
    """True if the build has ``-object monitor-qmp`` (``-mon`` is deprecated from 11.1)."""
    try:
        out = subprocess.run([qemu_system, "-object", "help"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(r"^\s*monitor-qmp\s*$", out.stdout, re.M) is not None


def _copy_sparse(src: Path, dest: Path) -> None:
    """Copy ``src``, only its data: holes stay holes (a fresh image is mostly holes)."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:  # in the kernel, no copy through Python
                offset += os.copy_file_range(fin.fileno(), fout.fileno(), end - offset,
                                             offset, offset) or end - offset
            pos = end


async def _cancelled(task: asyncio.Future[Any], grace: float = 1.0) -> None:
    """Cancel ``task`` and give it ``grace`` seconds to finish; what it raised no longer
    matters (but a KeyboardInterrupt still does).  Bounded: a task that ignores its
    cancellation (qemu.qmp's, after a Ctrl-C landed inside it) cannot hang the harness,
    as ``await task`` or ``asyncio.wait_for`` would."""
    task.cancel()
    await asyncio.wait({task}, timeout=grace)
    if task.done() and not task.cancelled():
        exc = task.exception()  # retrieved, so asyncio does not log it
        if isinstance(exc, KeyboardInterrupt):
            raise exc


async def _within(aw: Awaitable[Any], timeout: float) -> None:
    """Run ``aw`` for at most ``timeout`` seconds (then cancel it, bounded)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task not in done:
        await _cancelled(task)
    elif not task.cancelled():
        task.exception()  # retrieved: a broken connection's error does not matter here


def _sh_quote_relocatable(arg: str, folder: str) -> str:
    """Quote ``arg`` for sh, with ``folder`` replaced by ``"$HERE"`` (artifacts move)."""
    pieces = arg.split(folder)
    return '"$HERE"'.join(shlex.quote(p) if p else "" for p in pieces) or "''"


def event_matches(event: Mapping[str, Any], name: str, data: Mapping[str, Any] | None) -> bool:
    """Does ``event`` have this name and (recursively) at least this data?"""
    return event.get("event") == name and _partial_match(event.get("data", {}), data or {})


def _partial_match(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _partial_match(actual[k], v) for k, v in wanted.items())
    return bool(actual == wanted)


class _RecordingClient(QMPClient):
    """A QMPClient that shows every message to its machine (log and event stream)."""

    def __init__(self, name: str, on_message: Callable[[str, Any], None]):
        super().__init__(name)
        self._observe = on_message

    # Not super()'s: qemu.qmp's hooks only log, and format each message as JSON for
    # it even when debug logging is off (~0.1 ms a message, 5 % of a scenario's time;
    # far more in an event flood).  The machine's own log keeps every message.
    def _cb_outbound(self, msg):  # type: ignore[no-untyped-def]
        self._observe(">", dict(msg))
        return msg

    def _cb_inbound(self, msg):  # type: ignore[no-untyped-def]
        self._observe("<", dict(msg))
        return msg

    async def _event_dispatch(self, msg):  # type: ignore[no-untyped-def]
        """Events go to the machine only (through :meth:`_cb_inbound`), whose list is
        capped.  qemu.qmp's default listener (``self.events``) would queue every event,
        unbounded: a job that ignores an error emits ~150,000 a second."""


class Machine:
    """A real ``qemu-system-x86_64`` with QMP, as a context manager.

    >>> with Machine(build, workdir, args=["-blockdev", "..."]) as vm:
    ...     vm.cmd("blockdev-backup", {...})
    ...     vm.wait_event("BLOCK_JOB_COMPLETED", {"device": "job0"})
    """

    def __init__(self, build: QemuBuild, workdir: Path, *, name: str = "vm",
                 args: Sequence[str] = (), machine_type: str = "pc", accel: str = "tcg",
                 command_timeout: float = COMMAND_TIMEOUT, event_timeout: float = EVENT_TIMEOUT,
                 launch_timeout: float = LAUNCH_TIMEOUT, console: bool = False):
        self.build = build
        self.name = name
        self.workdir = Path(workdir)
        self.machine_type = machine_type
        self.accel = accel
        self.command_timeout = command_timeout
        self.event_timeout = event_timeout
        self.launch_timeout = launch_timeout
        self._args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _RecordingClient | None = None
        self._exited: asyncio.Future[int] | None = None
        self._pidfd: int | None = None
        self._new_event: asyncio.Event | None = None
        self._events: list[dict[str, Any]] = []
        self._consumed: set[int] = set()
        self._unconsumed_from = 0  # every event before this index has been consumed
        self._kept_by_name: Counter[str] = Counter()
        self._stdout_offset = 0
        self._killed_by_harness = False
        self._shut_down = False
        self._death_reported = False  # QEMUDied / QEMUUnresponsive raised: the test knows
        self._expected_exit: str | None = None
        self._waits = 0
        self._wait_of_event: dict[int, int] = {}  # id(event) -> the wait that returned it
        self.cmdline: list[str] = []
        self.conversation: Conversation | None = None
        self.console_enabled = console
        self._console_sock: socket.socket | None = None
        self._console_buf = bytearray()
        self._console_log: Any = None
        self._changed: asyncio.Event | None = None  # any event or console data arrived
        self.exitcode: int | None = None

    # ----------------------------------------------------------------- paths
    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.stderr"

    @property
    def qmp_log_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp.log"

    @property
    def console_path(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def reproducer_path(self) -> Path:
        return self.workdir / f"{self.name}.reproduce.sh"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ---------------------------------------------------------------- launch
    def _monitor_args(self, fd: int) -> list[str]:
        chardev = ["-chardev", f"socket,id=qmp,fd={fd}"]
        if supports_monitor_object(str(self.build.qemu_system)):
            return [*chardev, "-object", "monitor-qmp,id=qmp-monitor,chardev=qmp"]
        return [*chardev, "-mon", "chardev=qmp,mode=control"]

    def _base_args(self) -> list[str]:
        return [str(self.build.qemu_system), "-nodefaults", "-display", "none",
                "-machine", self.machine_type, "-accel", self.accel]

    def launch(self) -> Machine:
        """Start QEMU and complete the QMP handshake, or raise :class:`LaunchFailure`."""
        if self._proc is not None:
            raise RuntimeError("launch() called twice")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()]
        console_theirs = None
        if self.console_enabled:
            # The guest's serial line, over a socketpair too: bidirectional, no path.
            self._console_sock, console_theirs = socket.socketpair()
            fds.append(console_theirs.fileno())
        try:
            self.cmdline = self._base_args() + self._monitor_args(theirs.fileno()) + self._args
            if console_theirs is not None:
                self.cmdline += ["-chardev", f"socket,id=console,fd={console_theirs.fileno()}",
                                 "-serial", "chardev:console"]
            self._write_reproducer()
            self.conversation = Conversation(self.qmp_log_path)
            self.conversation.record("#", {"launch": self.cmdline, "workdir": str(self.workdir),
                                           "command-timeout": self.command_timeout,
                                           "images": self._save_images()})
            prefix = _pdeathsig_prefix()
            if prefix and not os.access(self.cmdline[0], os.X_OK):
                # As Popen would say it (setpriv would only exit 127).
                raise LaunchFailure(f"cannot start {self.build.qemu_system}: no executable "
                                    "file there", cmdline=self.cmdline)
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                try:
                    self._proc = subprocess.Popen(
                        [*prefix, *self.cmdline], stdin=subprocess.DEVNULL, stdout=out,
                        stderr=err, pass_fds=fds, start_new_session=True,
                        preexec_fn=None if prefix else _die_with_parent, cwd=self.workdir)
                except OSError as exc:
                    raise LaunchFailure(f"cannot start {self.build.qemu_system}: {exc.strerror}",
                                        cmdline=self.cmdline) from None
        finally:
            theirs.close()
            if console_theirs is not None:
                console_theirs.close()
        self._loop = asyncio.new_event_loop()
        self._exited = self._loop.create_future()
        self._new_event = asyncio.Event()
        self._changed = asyncio.Event()
        self._watch_exit()
        if self._console_sock is not None:
            # Open for the machine's life; closed in _close_loop().
            self._console_log = open(self.console_path, "wb", buffering=0)  # noqa: SIM115
            self._console_sock.setblocking(False)
            self._loop.add_reader(self._console_sock.fileno(), self._on_console)
        self._client = _RecordingClient(self.name, self._on_message)
        try:
            self._run(self._client.connect(ours), self.launch_timeout, "the QMP greeting")
        except QEMUError as exc:
            self.expect_abnormal_exit("it failed to start: LaunchFailure says so")
            self.shutdown()
            raise LaunchFailure(f"QEMU failed to start: {exc.message}", cmdline=self.cmdline,
                                log_tail=self.log_tail(), exitcode=self.exitcode) from None
        return self

    def _save_images(self) -> str | None:
        """Copy the files of the test's folder that the command line names, as they are
        before QEMU starts, for ``replay.py``; returns the folder (None: nothing to copy).

        Not needed where the test's images were made by a recorded recipe
        (``images.jsonl``), which replays them.
        """
        if (self.workdir / "images.jsonl").exists():
            return None
        folder = self.workdir / images_folder(self.name)
        prefix = re.escape(str(self.workdir) + "/")
        saved = False
        for arg in self._args:
            for match in re.findall(prefix + r'[^",\s]+', arg):
                src = Path(match)
                if src.is_file() and folder not in src.parents:
                    dest = folder / src.relative_to(self.workdir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _copy_sparse(src, dest)
                    saved = True
        return folder.name if saved else None

    def _watch_exit(self) -> None:
        assert self._loop and self._proc and self._exited
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        if self._pidfd is not None:
            self._loop.add_reader(self._pidfd, self._on_exit)
        else:  # no pidfd (old kernel): poll the child
            async def poll() -> None:
                while self._proc and self._proc.poll() is None:
                    await asyncio.sleep(0.05)
                self._on_exit()
            self._loop.create_task(poll())

    def _on_exit(self) -> None:
        assert self._proc and self._exited and self._loop
        code = self._proc.poll()
        if code is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        self.exitcode = code
        if not self._exited.done():
            self._exited.set_result(code)

    def _write_reproducer(self) -> None:
        """A script that runs the same QEMU by hand, with QMP on a socket in its folder."""
        args = [a for a in self.cmdline]
        i = args.index("-chardev")
        args[i + 1] = "socket,id=qmp,path=qmp.sock,server=on,wait=off"
        args = ["stdio,id=console" if a.startswith("socket,id=console,fd=") else a
                for a in args]
        quoted = " \\\n    ".join(_sh_quote_relocatable(a, str(self.workdir)) for a in args)
        self.reproducer_path.write_text(
            "#!/bin/sh\n"
            f"# Runs QEMU as the harness did for {self.name!r}, to poke at by hand; QMP\n"
            "# listens on ./qmp.sock (qmp-shell qmp.sock).  The images are as the test\n"
            "# left them; replay.py starts from them as they were and resends the\n"
            f"# commands of {self.qmp_log_path.name}.\n"
            'HERE="$(cd "$(dirname "$0")" && pwd)"\ncd "$HERE"\n'
            f"exec {quoted}\n")
        self.reproducer_path.chmod(0o755)

    # --------------------------------------------------------- waiting core
    def _on_message(self, direction: str, msg: dict[str, Any]) -> None:
        if self.conversation:
            self.conversation.record(direction, msg)
        if direction == "<" and "event" in msg:
            if self._kept_by_name[msg["event"]] < MAX_KEPT_EVENTS:
                self._kept_by_name[msg["event"]] += 1
                self._events.append(msg)
            if self._new_event:
                self._new_event.set()
            if self._changed:
                self._changed.set()

    def _run(self, aw: Awaitable[T], timeout: float, what: str, *, waiting: bool = False) -> T:
        """Run ``aw`` until done, QEMU exits, or ``timeout``; raise the matching error."""
        if self._loop is None or self._loop.is_closed():
            raise QEMUDied(f"{self.name}: cannot wait for {what}: QEMU is not running",
                           cmdline=self.cmdline)
        return self._loop.run_until_complete(self._guarded(aw, timeout, what, waiting))

    async def _guarded(self, aw: Awaitable[T], timeout: float, what: str, waiting: bool) -> T:
        assert self._exited is not None
        task = asyncio.ensure_future(aw)
        racing: set[asyncio.Future[Any]] = {task, self._exited}
        done, _ = await asyncio.wait(racing, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done and not task.cancelled():
            exc = task.exception()
            if exc is None:
                return task.result()
            if isinstance(exc, ExecuteError):
                raise exc  # QEMU refused the command: it answered, so it lives
            # A lost connection usually means QEMU is dying: give it a moment to be reaped.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), 1.0)
            if not self._exited.done():
                raise QEMUError(f"{self.name}: {what} failed: {exc!r}", cmdline=self.cmdline,
                                log_tail=self.log_tail()) from exc
        else:
            await _cancelled(task)
        if self._exited.done():
            self._death_reported = True
            raise QEMUDied(f"{self.name}: QEMU exited ({describe_exit(self._exited.result())}) "
                           f"while the harness waited for {what}", cmdline=self.cmdline,
                           log_tail=self.log_tail(), exitcode=self._exited.result())
        if waiting and await self._answers_ping():
            raise WaitTimeout(f"{self.name}: timed out after {timeout:g}s waiting for {what} "
                              "(QEMU still answers QMP)", cmdline=self.cmdline,
                              log_tail=self.log_tail())
        self._death_reported = True
        raise QEMUUnresponsive(
            f"{self.name}: QEMU stopped answering QMP: no reply within {timeout:g}s to {what} "
            f"(process {self._process_state()})", cmdline=self.cmdline, log_tail=self.log_tail())

    async def _answers_ping(self) -> bool:
        assert self._client is not None
        task = asyncio.ensure_future(self._client.execute("query-status"))
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if task in done and task.exception() is None:
            return True
        await _cancelled(task)
        return False

    def _process_state(self) -> str:
        """'stopped (SIGSTOP?)' / 'running' / 'sleeping', from /proc."""
        if self._proc is None:
            return "not started"
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return "gone"
        state = stat.rsplit(")", 1)[1].split()[0]
        return {"T": "is stopped (SIGSTOP?)", "t": "is stopped by a tracer",
                "R": "is running (busy: livelock?)", "S": "is sleeping",
                "D": "is in uninterruptible I/O", "Z": "is a zombie"}.get(state, f"state {state}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of QEMU's stderr and stdout."""
        out = []
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    out.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ QMP
    def cmd(self, command: str, args: Mapping[str, Any] | None = None, *,
            timeout: float | None = None) -> Any:
        """Execute ``command``; return its ``return`` value or raise :class:`CommandFailed`
        (as ``QEMUMachine.cmd()``)."""
        assert self._client is not None, "launch() first"
        try:
            return self._run(self._client.execute(command, dict(args) if args else None),
                             self.command_timeout if timeout is None else timeout,
                             f"QMP {command}")
        except ExecuteError as exc:
            raise CommandFailed(command, dict(args or {}), exc.error.error.class_,
                                exc.error.error.desc) from None

    def qmp(self, command: str, args: Mapping[str, Any] | None = None, *,
            timeout: float | None = None) -> dict[str, Any]:
        """Execute ``command``; return the whole reply, ``{"return": ...}`` or
        ``{"error": {"class": ..., "desc": ...}}`` (as ``QEMUMachine.qmp()``)."""
        try:
            return {"return": self.cmd(command, args, timeout=timeout)}
        except CommandFailed as exc:
            return {"error": {"class": exc.error_class, "desc": exc.desc}}

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run an HMP command; returns its reply and what QEMU printed on stdout meanwhile
        (qemu-io prints there, not in the reply)."""
        start = self.stdout_path.stat().st_size
        reply = str(self.cmd("human-monitor-command", {"command-line": command_line},
                             timeout=timeout))
        with open(self.stdout_path, "rb") as fh:
            fh.seek(start)
            output = (reply + fh.read().decode(errors="replace")).strip()
        self._note({"hmp-output": abridged(output)})  # a dump stays in the stdout log
        return output

    def qemu_io(self, target: str, command: str, *, device: bool = True) -> QemuIoResult:
        """Run ``qemu-io`` on a guest device (``-d``) or a node, as a guest would write."""
        escaped = command.replace("\\", "\\\\").replace('"', '\\"')
        line = f'qemu-io {"-d " if device else ""}{target} "{escaped}"'
        return QemuIoResult(command, self.hmp(line))

    # -------------------------------------------------------------- console
    def _on_console(self) -> None:
        assert self._console_sock is not None
        try:
            data = self._console_sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # QEMU closed the line (it is exiting)
            assert self._loop is not None
            self._loop.remove_reader(self._console_sock.fileno())
            return
        self._console_buf += data
        if self._console_log:
            self._console_log.write(data)
        if self._changed:
            self._changed.set()

    @property
    def console_text(self) -> str:
        """Everything the guest printed on its serial console so far."""
        return self._console_buf.decode(errors="replace")

    def wait_console(self, pattern: str | re.Pattern[str], *, timeout: float | None = None,
                     start: int = 0) -> re.Match[str]:
        """Wait until the console output (from offset ``start``) matches ``pattern``."""
        if self._console_sock is None:
            raise RuntimeError("wait_console() needs Machine(console=True)")
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self.wait_for(lambda: regex.search(self.console_text, start),
                             f"console output matching {regex.pattern!r}", timeout=timeout)

    def wait_for(self, check: Callable[[], T | None], what: str, *,
                 timeout: float | None = None) -> T:
        """Wait until ``check()`` returns a truthy value, re-checking whenever an event or
        console output arrives (``check`` reads :attr:`events`, :attr:`console_text`)."""
        async def watch() -> T:
            assert self._changed is not None
            while True:
                value = check()
                if value:
                    return value
                self._changed.clear()
                await self._changed.wait()
        return self._run(watch(), self.event_timeout if timeout is None else timeout, what,
                         waiting=True)

    # --------------------------------------------------------------- events
    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event received so far, in order (up to :data:`MAX_KEPT_EVENTS` of a name)."""
        return list(self._events)

    def forget_events(self) -> None:
        """Drop the events received so far: no later wait or listing sees them (the QMP
        log keeps them).  For a machine that serves many cases in turn, whose waits
        would otherwise scan every earlier case's events again (the explorer's)."""
        self._events.clear()
        self._consumed.clear()
        self._unconsumed_from = 0
        self._kept_by_name.clear()
        self._wait_of_event.clear()

    def events_named(self, name: str, data: Mapping[str, Any] | None = None
                     ) -> list[dict[str, Any]]:
        return [e for e in self._events if event_matches(e, name, data)]

    def wait_event(self, name: str, data: Mapping[str, Any] | None = None, *,
                   timeout: float | None = None,
                   after: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The earliest not yet consumed event ``name`` whose data contains ``data``.

        Events already received count; each event is returned by at most one wait.
        ``after``: only events received after this one (an event this machine returned).
        """
        return self.wait_any_event([(name, data)], timeout=timeout, after=after)

    def _index_after(self, event: Mapping[str, Any] | None) -> int:
        if event is None:
            return 0
        for i in range(len(self._events) - 1, -1, -1):
            if self._events[i] is event:
                return i + 1
        raise ValueError("after= must be an event this machine returned")

    def wait_any_event(self, wanted: Sequence[tuple[str, Mapping[str, Any] | None]], *,
                       timeout: float | None = None,
                       after: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The earliest unconsumed event matching any of ``(name, data)``.

        The conversation records what was awaited and what came, so that the wait
        can be replayed (``replay.py``).
        """
        want = " or ".join(f"event {n}" + (f" {dict(d)}" if d else "") for n, d in wanted)
        limit = self.event_timeout if timeout is None else timeout
        self._waits += 1
        record: dict[str, Any] = {
            "wait": [{"event": n, **({"data": dict(d)} if d else {})} for n, d in wanted],
            "timeout": limit,
            "after-wait": None if after is None else self._wait_of_event.get(id(after))}
        try:
            event = self._run(self._wait_for(
                lambda e: any(event_matches(e, n, d) for n, d in wanted),
                self._index_after(after)), limit, want, waiting=True)
        except WaitTimeout:
            self._note({**record, "got": None})
            raise
        self._wait_of_event[id(event)] = self._waits
        self._note({**record, "got": event})
        return event

    def _note(self, entry: str | dict[str, Any]) -> None:
        if self.conversation:
            self.conversation.record("#", entry)

    async def _wait_for(self, pred: Callable[[dict[str, Any]], bool],
                        start: int = 0) -> dict[str, Any]:
        assert self._new_event is not None
        scanned = max(start, self._unconsumed_from)
        while True:
            for i in range(scanned, len(self._events)):
                if i not in self._consumed and pred(self._events[i]):
                    self._consumed.add(i)
                    while self._unconsumed_from in self._consumed:
                        self._unconsumed_from += 1
                    return self._events[i]
            scanned = len(self._events)
            self._new_event.clear()
            await self._new_event.wait()

    def wait_job_status(self, job_id: str, status: str, *, timeout: float | None = None,
                        after: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.wait_event("JOB_STATUS_CHANGE", {"id": job_id, "status": status},
                               timeout=timeout, after=after)

    # -------------------------------------------------------------- teardown
    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to QEMU's whole process group (for tests of the harness itself)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def expect_abnormal_exit(self, reason: str) -> None:
        """Declare that this QEMU may end on a signal, a non-zero status or a SIGKILL
        after an ignored ``quit``: :meth:`shutdown` then does not raise."""
        self._expected_exit = reason

    def shutdown(self, *, quit_timeout: float = QUIT_TIMEOUT) -> int | None:
        """Stop QEMU whatever state it is in; returns its exit code.

        ``quit`` first; if QEMU does not exit within ``quit_timeout``, SIGKILL its
        process group (``quit_timeout=0``: SIGKILL at once, on purpose).  Always closes
        the connection, the loop and the log.  Then raises :class:`AbnormalShutdown` if
        QEMU ended on a signal or a non-zero status, or ignored ``quit``, unless this
        was declared (:meth:`expect_abnormal_exit`) or already raised as
        :class:`QEMUDied` / :class:`QEMUUnresponsive`.  Later calls do nothing.
        """
        if self._shut_down:
            return self.exitcode
        self._shut_down = True
        proc = self._proc
        ignored_quit = False
        try:
            if quit_timeout > 0 and proc is not None and proc.poll() is None \
                    and self._client is not None and self._loop is not None \
                    and not self._loop.is_closed():
                # QEMU may die, hang or drop the connection on quit: the exit status says,
                # and a death met here is not one the test was told about.
                reported = self._death_reported
                with contextlib.suppress(QEMUError, ExecuteError):
                    self._run(self._client.execute("quit"), quit_timeout, "QMP quit")
                with contextlib.suppress(QEMUError):
                    self._run(asyncio.shield(self._exited), quit_timeout,  # type: ignore[arg-type]
                              "QEMU to exit after quit")
                ignored_quit = proc.poll() is None
                self._death_reported = reported
            if proc is not None and proc.poll() is None:
                self._killed_by_harness = True
                self._note("QEMU did not exit after quit: SIGKILL" if ignored_quit else
                           "SIGKILL, no quit (quit_timeout=0)")
                self.kill(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            # Anything left in QEMU's process group (helpers it forked) goes too.
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                self.exitcode = proc.poll()
        finally:
            self._close_loop()
            if self.conversation:
                self.conversation.record("#", {"exit": self.exitcode,
                                               "killed-by-harness": self._killed_by_harness})
                self.conversation.note(f"QEMU ended: {describe_exit(self.exitcode)}")
                self.conversation.close()
        problem = self._abnormal_exit(ignored_quit, quit_timeout)
        if problem and not self._death_reported and self._expected_exit is None:
            raise AbnormalShutdown(f"{self.name}: {problem}", cmdline=self.cmdline,
                                   log_tail=self.log_tail(), exitcode=self.exitcode)
        return self.exitcode

    def _abnormal_exit(self, ignored_quit: bool, quit_timeout: float) -> str | None:
        """What was abnormal about QEMU's end, if anything."""
        if ignored_quit:
            return (f"QEMU did not exit within {quit_timeout:g}s of quit and was killed "
                    f"({describe_exit(self.exitcode)})")
        if self.exitcode is None or self.exitcode == 0:
            return None
        if self._killed_by_harness and self.exitcode == -signal.SIGKILL:
            return None  # shutdown(quit_timeout=0): killed on purpose
        return f"QEMU ended abnormally: {describe_exit(self.exitcode)}"

    def _close_loop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._client is not None:
            # The connection may be gone or broken already (QEMU exited): that is fine.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                loop.run_until_complete(_within(self._client.disconnect(), 2.0))
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._console_sock is not None:
            loop.remove_reader(self._console_sock.fileno())
            with contextlib.suppress(BlockingIOError, OSError):
                while data := self._console_sock.recv(65536):  # what is left in the socket
                    self._console_buf += data
                    if self._console_log:
                        self._console_log.write(data)
            self._console_sock.close()
        if self._console_log:
            self._console_log.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled tasks finish
        loop.close()

    @property
    def killed_by_harness(self) -> bool:
        return self._killed_by_harness

    def __enter__(self) -> Machine:
        return self.launch()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class Launcher:
    """``launch(args, name=..., **machine_options)``: machines in one folder, started
    with ``defaults`` for their options; :meth:`shut_down` ends every one it started and
    returns the abnormal exits met (a signal, a non-zero status) instead of raising the
    first, so that none is left running.  ``on_start`` sees each machine launched (the
    pytest plugin's registry of live machines, for Ctrl-C)."""

    def __init__(self, build: QemuBuild, folder: Path, *,
                 defaults: Mapping[str, Any] | None = None,
                 on_start: Callable[[Machine], None] | None = None):
        self.build, self.folder = build, folder
        self.defaults = dict(defaults or {})
        self.on_start = on_start
        self.started: list[Machine] = []

    def __call__(self, args: Sequence[str] = (), *, name: str | None = None,
                 **kwargs: Any) -> Machine:
        vm = Machine(self.build, self.folder, name=name or f"vm{len(self.started)}",
                     args=args, **{**self.defaults, **kwargs})
        self.started.append(vm)
        if self.on_start is not None:
            self.on_start(vm)
        return vm.launch()

    def shut_down(self, expected_abnormal_exit: str | None = None) -> list[AbnormalShutdown]:
        problems: list[AbnormalShutdown] = []
        for vm in self.started:
            if expected_abnormal_exit is not None:
                vm.expect_abnormal_exit(expected_abnormal_exit)
            try:
                vm.shutdown()
            except AbnormalShutdown as exc:
                problems.append(exc)
        return problems


@contextlib.contextmanager
def launcher(build: QemuBuild, folder: Path) -> Iterator[Launcher]:
    """A :class:`Launcher` outside pytest (benchmarks, scripts), as the ``launch_vm``
    fixture is inside it: every machine it started is shut down when the block ends,
    whatever happened; the first abnormal exit is raised then."""
    launch = Launcher(build, folder)
    try:
        yield launch
    finally:
        problems = launch.shut_down()
        if problems:
            raise problems[0]
