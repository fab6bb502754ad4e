"""A QMP-rewriting proxy in front of a real QEMU: a simulated fixed (or broken) build.

``python -m harness.qemu.qmp_proxy CONFIG -- <qemu arguments>`` runs the real
``qemu-system-x86_64`` named in the JSON file CONFIG as its child, with the QMP
chardev given as ``socket,id=X,fd=N`` replaced by a socketpair of its own, and relays
QMP between the caller and QEMU, applying the rules CONFIG names (:data:`RULES`).
A run without a QMP chardev (``--version``, ``-object help``) just execs QEMU.

Every guarantee of the harness holds through it: QEMU is its child in the same
process group, with a parent-death signal; SIGTERM, SIGINT, SIGHUP are forwarded;
it exits when QEMU does, with QEMU's exit status, or by QEMU's signal (a SIGABRT of
QEMU is a SIGABRT of the proxy); its own waits are bounded.

Standard library only: it starts with every QEMU launch.  The rules are named after
the departures of :mod:`harness.scenarios.departures` they fix.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
HIDDEN_ID = "cbw-proxy#"
HOLD_TIMEOUT = 10.0     # seconds a rule may hold the caller's commands back
CRUISE_SPEED = 64 * 1024 * 1024  # bytes/s: a job that ignores errors still yields
_PR_SET_PDEATHSIG = 1


def note(text: str) -> None:
    """What the proxy did, on QEMU's stderr (the harness shows its tail on failure)."""
    sys.stderr.write(f"cbw-proxy: {text}\n")
    sys.stderr.flush()


# ------------------------------------------------------------ what QEMU was told
@dataclass
class Job:
    """A blockdev-backup job, as its command described it."""

    job_id: str
    args: dict[str, Any]
    broken_error: str | None = None   # set when the proxy decides its snapshot broke
    ended: bool = False

    @property
    def sync(self) -> str:
        return str(self.args.get("sync"))

    @property
    def on_cbw_error(self) -> str | None:
        return self.args.get("on-cbw-error")

    @property
    def ignores_errors(self) -> bool:
        return "ignore" in (self.args.get("on-source-error"), self.args.get("on-target-error"))


@dataclass
class Fault:
    """A blkdebug inject-error rule: where it strikes (None: any region) and its errno."""

    sector: int | None
    once: bool
    errno: int
    spent: bool = False

    def meets(self, offset: int, length: int) -> bool:
        if self.spent:
            return False
        return self.sector is None or offset <= self.sector * 512 < offset + length


@dataclass
class World:
    """What the proxy learnt from the command line and the commands: faults and jobs."""

    faults: list[Fault] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)

    def learn_node(self, node: Any) -> None:
        for d in _dicts(node):
            if d.get("driver") != "blkdebug":
                continue
            for rule in d.get("inject-error", []):
                self.faults.append(Fault(rule.get("sector"), bool(rule.get("once", False)),
                                         int(rule.get("errno", 5))))
            if d.get("config"):  # rules in a file: treat as striking any region
                self.faults.append(Fault(None, False, 5))

    def guest_write_meets_fault(self, offset: int, length: int) -> Fault | None:
        for f in self.faults:
            if f.meets(offset, length):
                if f.once:
                    f.spent = True
                return f
        return None


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _dicts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _dicts(v)


_QEMU_IO_WRITE = re.compile(r'^qemu-io\s+(?:-d\s+)?\S+\s+"(?:write|aio_write)\b.*?'
                            r'(\d+)\s+(\d+)"\s*$')


def hmp_guest_write(msg: Message) -> tuple[int, int] | None:
    """Offset and length of an HMP ``qemu-io ... "write ... OFF LEN"`` command."""
    if msg.get("execute") != "human-monitor-command":
        return None
    m = _QEMU_IO_WRITE.match(str(msg.get("arguments", {}).get("command-line", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


# ------------------------------------------------------------------ the rules
class Rule:
    """One rewrite.  Hooks return the (possibly rewritten) message, or None to drop it."""

    name = ""

    def client(self, relay: Relay, msg: Message) -> Message | None:
        return msg

    def reply(self, relay: Relay, command: Message, reply: Message) -> Message | None:
        return reply

    def event(self, relay: Relay, event: Message) -> Message | None:
        return event


def _snapshot_error(fault: Fault) -> str:
    return os.strerror(fault.errno)


class SyncFullBrokenSnapshotFails(Rule):
    """A sync=full + break-snapshot job whose copy-before-write met a fault ends with an
    error instead of completing: its statuses are those of a failed job."""

    name = "sync-full-broken-snapshot-completes"

    def client(self, relay: Relay, msg: Message) -> Message | None:
        write = hmp_guest_write(msg)
        if write is None:
            return msg
        for job in relay.world.jobs.values():
            if job.sync == "full" and job.on_cbw_error == "break-snapshot" and not job.ended \
                    and job.broken_error is None:
                fault = relay.world.guest_write_meets_fault(*write)
                if fault is not None:
                    job.broken_error = _snapshot_error(fault)
                    note(f"{self.name}: guest write at {write[0]} broke the snapshot of "
                         f"{job.job_id}: the job will fail")
        return msg

    def event(self, relay: Relay, event: Message) -> Message | None:
        data = event.get("data", {})
        job = relay.world.jobs.get(data.get("id", data.get("device")))
        if job is None or job.broken_error is None or job.sync != "full":
            return event
        name = event["event"]
        if name == "JOB_STATUS_CHANGE" and data["status"] == "waiting":
            return {**event, "data": {**data, "status": "aborting"}}
        if name == "JOB_STATUS_CHANGE" and data["status"] == "pending":
            return None
        if name == "BLOCK_JOB_PENDING":
            return None
        if name == "BLOCK_JOB_COMPLETED" and "error" not in data:
            note(f"{self.name}: {job.job_id} completed: reported as failed")
            return {**event, "data": {**data, "error": job.broken_error}}
        return event

    def reply(self, relay: Relay, command: Message, reply: Message) -> Message | None:
        if command.get("execute") != "query-jobs" or not isinstance(reply.get("return"), list):
            return reply
        jobs = []
        for j in reply["return"]:
            job = relay.world.jobs.get(j.get("id"))
            if job is not None and job.broken_error and job.sync == "full" and \
                    j.get("status") in ("waiting", "pending"):
                j = {**j, "status": "aborting"}
            jobs.append(j)
        return {**reply, "return": jobs}


class SyncNoneBrokenSnapshotFails(Rule):
    """A sync=none + break-snapshot job whose copy-before-write met a fault is ended at
    once, and ends as failed: the proxy cancels it (hidden) and reports the cancel as
    BLOCK_JOB_COMPLETED with an error.  The caller's commands wait until it is over,
    so query-jobs never shows it running after the snapshot broke.

    A guest's writes do not pass through QMP: before a query-jobs, the proxy asks
    query-blockstats whether a device was written to since (any region, then)."""

    name = "sync-none-broken-snapshot-runs-on"

    def __init__(self) -> None:
        self._checked: set[int] = set()
        self._breaking: dict[int, Job] = {}  # id(caller's command) -> job to end after it

    def _candidates(self, relay: Relay) -> list[Job]:
        return [j for j in relay.world.jobs.values() if j.sync == "none" and not j.ended
                and j.on_cbw_error == "break-snapshot" and j.broken_error is None]

    def client(self, relay: Relay, msg: Message) -> Message | None:
        write = hmp_guest_write(msg)
        if write is not None:
            for job in self._candidates(relay):
                fault = relay.world.guest_write_meets_fault(*write)
                if fault is not None:
                    job.broken_error = _snapshot_error(fault)
                    self._breaking[id(msg)] = job
            return msg
        if msg.get("execute") == "query-jobs" and id(msg) not in self._checked:
            jobs = self._candidates(relay)
            if jobs and relay.world.faults:
                self._checked.add(id(msg))
                relay.hidden("query-blockstats", {}, lambda r: self._stats(relay, jobs, r))
                return relay.HOLD
        return msg

    def _stats(self, relay: Relay, jobs: list[Job], reply: Message) -> None:
        written = any(s.get("stats", {}).get("wr_operations", 0) > 0
                      for s in reply.get("return", []))
        if written:
            for job in jobs:
                job.broken_error = _snapshot_error(relay.world.faults[0])
                self._end(relay, job)

    def reply(self, relay: Relay, command: Message, reply: Message) -> Message | None:
        job = self._breaking.pop(id(command), None)
        if job is not None:
            self._end(relay, job)  # before the caller learns that its write is done
        return reply

    def _end(self, relay: Relay, job: Job) -> None:
        note(f"{self.name}: the snapshot of {job.job_id} broke: ending the job")
        relay.hidden("block-job-cancel", {"device": job.job_id, "force": True})
        relay.hold_until(lambda e: e.get("event") in ("BLOCK_JOB_CANCELLED",
                                                       "BLOCK_JOB_COMPLETED")
                         and e.get("data", {}).get("device") == job.job_id)

    def event(self, relay: Relay, event: Message) -> Message | None:
        data = event.get("data", {})
        job = relay.world.jobs.get(data.get("device"))
        if event["event"] == "BLOCK_JOB_CANCELLED" and job is not None and job.broken_error \
                and job.sync == "none":
            note(f"{self.name}: {job.job_id} cancelled: reported as failed")
            return {**event, "event": "BLOCK_JOB_COMPLETED",
                    "data": {**data, "error": job.broken_error}}
        return event


class IgnoringJobYields(Rule):
    """A job that ignores errors is never released to full speed: at a finite speed its
    rate limiter sleeps between retries and QEMU keeps serving QMP."""

    name = "ignore-on-broken-snapshot-livelocks"

    def client(self, relay: Relay, msg: Message) -> Message | None:
        args = msg.get("arguments", {})
        if msg.get("execute") == "block-job-set-speed" and args.get("speed") == 0:
            job = relay.world.jobs.get(args.get("device"))
            if job is not None and job.ignores_errors:
                note(f"{self.name}: {job.job_id} ignores errors: speed 0 -> {CRUISE_SPEED}")
                return {**msg, "arguments": {**args, "speed": CRUISE_SPEED}}
        return msg


_QEMU_IO_TARGET = re.compile(r'^(qemu-io\s+(?:-d\s+)?)(\S+)(\s.*)$', re.S)


class BackupBelowFleecingFilter(Rule):
    """A backup of a copy-before-write node made by blockdev-add backs up the node's
    file instead, so that its filter goes below the fleecing filter and the
    snapshot-access node stays on its own; qemu-io on the job's filter goes to the
    fleecing filter, the top of the disk, so guest writes still meet both."""

    name = "fleecing-export-follows-backup-filter"

    def __init__(self) -> None:
        self._cbw_files: dict[str, str] = {}  # copy-before-write node -> its file
        self._tops: dict[str, str] = {}  # the job's filter-node-name -> the fleecing filter

    def client(self, relay: Relay, msg: Message) -> Message | None:
        args = msg.get("arguments", {})
        if msg.get("execute") == "blockdev-add" and args.get("driver") == "copy-before-write" \
                and isinstance(args.get("file"), str):
            self._cbw_files[args["node-name"]] = args["file"]
        elif msg.get("execute") == "blockdev-backup" and args.get("device") in self._cbw_files:
            device = args["device"]
            if "filter-node-name" in args:
                self._tops[args["filter-node-name"]] = device
            note(f"{self.name}: backup of {device} -> of {self._cbw_files[device]}")
            return {**msg, "arguments": {**args, "device": self._cbw_files[device]}}
        elif msg.get("execute") == "human-monitor-command":
            m = _QEMU_IO_TARGET.match(str(args.get("command-line", "")))
            if m and m.group(2) in self._tops:
                line = m.group(1) + self._tops[m.group(2)] + m.group(3)
                return {**msg, "arguments": {**args, "command-line": line}}
        return msg


class ReportsOldVersion(Rule):
    """The build says it is 7.2.22 (a fixed 7.2: the behaviour is the real build's)."""

    name = "cbw-timeout-wraps"

    def reply(self, relay: Relay, command: Message, reply: Message) -> Message | None:
        if command.get("execute") == "query-version" and "return" in reply:
            return {**reply, "return": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                                        "package": f"cbw-proxy: a 7.2 with {self.name} fixed"}}
        return reply


class SnapshotReadsAsFixed(ReportsOldVersion):
    """The build says it is 7.2.22: its snapshot reads are the real (later) build's."""

    name = "snapshot-read-leaving-copied-cluster"


class SnapshotDiscardAsFixed(ReportsOldVersion):
    """The build says it is 7.2.22: its snapshot discards are the real (later) build's."""

    name = "snapshot-discard-unaligned-aborts"


_SWAP = {"break-guest-write": "break-snapshot", "break-snapshot": "break-guest-write"}


def swap_on_cbw_error(value: Any) -> Any:
    """``value`` with every explicit on-cbw-error value swapped (the default is left)."""
    if isinstance(value, dict):
        return {k: (_SWAP.get(v, v) if k == "on-cbw-error" else swap_on_cbw_error(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [swap_on_cbw_error(v) for v in value]
    return value


class SwapsOnCbwError(Rule):
    """A regression: each explicit on-cbw-error value acts as the other one."""

    name = "regression-swap-on-cbw-error"

    def client(self, relay: Relay, msg: Message) -> Message | None:
        if msg.get("execute") in ("blockdev-backup", "blockdev-add"):
            return {**msg, "arguments": swap_on_cbw_error(msg.get("arguments", {}))}
        return msg


RULES: dict[str, Callable[[], Rule]] = {r.name: r for r in (
    SyncFullBrokenSnapshotFails, SyncNoneBrokenSnapshotFails, IgnoringJobYields,
    BackupBelowFleecingFilter,
    ReportsOldVersion, SnapshotReadsAsFixed, SnapshotDiscardAsFixed, SwapsOnCbwError)}


def rewrite_args(rules: list[str], args: list[str]) -> list[str]:
    """The command line as the rules want it (only the regression touches it)."""
    if "regression-swap-on-cbw-error" not in rules:
        return args
    out = list(args)
    for i in range(len(out) - 1):
        if out[i] == "-blockdev" and out[i + 1].startswith("{"):
            out[i + 1] = json.dumps(swap_on_cbw_error(json.loads(out[i + 1])))
    return out


# ------------------------------------------------------------------ the relay
class Relay:
    """Moves QMP messages between the caller and QEMU, through the rules."""

    HOLD: Message = {}  # a client hook's answer: keep this command back for now

    def __init__(self, client: socket.socket, qemu: socket.socket, rules: list[Rule],
                 world: World):
        self.client_sock, self.qemu_sock = client, qemu
        self.rules, self.world = rules, world
        self._bufs = {client.fileno(): bytearray(), qemu.fileno(): bytearray()}
        self._held: collections.deque[Message] = collections.deque()
        self._hold: tuple[Callable[[Message], bool], float] | None = None
        # hidden command id -> (what to do with its reply, when to stop waiting for it)
        self._waiting_hidden: dict[str, tuple[Callable[[Message], None] | None, float]] = {}
        self._commands: collections.deque[Message] = collections.deque()  # awaiting replies
        self._next_id = 0
        self.client_open = True

    # -- outgoing
    @staticmethod
    def _send(sock: socket.socket, msg: Message) -> None:
        try:
            sock.sendall(json.dumps(msg).encode() + b"\r\n")
        except OSError:
            pass  # the other side is gone; the exit path handles it

    def hidden(self, execute: str, arguments: Message,
               on_reply: Callable[[Message], None] | None = None) -> None:
        """Send a command of the proxy's own; its reply never reaches the caller.  The
        caller's commands wait until the reply came."""
        self._next_id += 1
        ident = f"{HIDDEN_ID}{self._next_id}"
        self._waiting_hidden[ident] = (on_reply, time.monotonic() + HOLD_TIMEOUT)
        self._send(self.qemu_sock, {"execute": execute, "arguments": arguments, "id": ident})

    def hold_until(self, condition: Callable[[Message], bool]) -> None:
        """Keep the caller's commands back until an event meets ``condition`` (bounded)."""
        self._hold = (condition, time.monotonic() + HOLD_TIMEOUT)

    @property
    def holding(self) -> bool:
        return bool(self._waiting_hidden) or self._hold is not None

    # -- incoming
    def feed(self, fd: int, data: bytes) -> None:
        buf = self._bufs[fd]
        buf += data
        decoder = json.JSONDecoder()
        text = buf.decode(errors="replace")
        pos = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos >= len(text):
                break
            try:
                msg, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break
            if fd == self.client_sock.fileno():
                self._from_client(msg)
            else:
                self._from_qemu(msg)
        del buf[:len(text[:pos].encode())]

    def _from_client(self, msg: Message) -> None:
        self._learn_command(msg)
        self._held.append(msg)
        self.release()

    def release(self) -> None:
        """Pass on the held commands, as long as no rule holds them."""
        now = time.monotonic()
        if self._hold is not None and now > self._hold[1]:
            note("the awaited event did not come: passing the held commands on")
            self._hold = None
        for ident, (_, deadline) in list(self._waiting_hidden.items()):
            if now > deadline:
                note(f"no reply to the proxy's command {ident}: passing the held commands on")
                del self._waiting_hidden[ident]
        while self._held and not self.holding:
            msg = self._held.popleft()
            out: Message | None = msg
            for rule in self.rules:
                out = rule.client(self, out) if out is not None else None
                if out is self.HOLD:
                    self._held.appendleft(msg)
                    break
            else:
                if out is not None:
                    self._commands.append(msg)
                    self._send(self.qemu_sock, out)

    def _learn_command(self, msg: Message) -> None:
        args = msg.get("arguments", {})
        if msg.get("execute") == "blockdev-add":
            self.world.learn_node(args)
        elif msg.get("execute") == "blockdev-backup":
            job_id = args.get("job-id", args.get("device"))
            self.world.jobs[job_id] = Job(job_id, dict(args))

    def _from_qemu(self, msg: Message) -> None:
        ident = msg.get("id")
        if isinstance(ident, str) and ident.startswith(HIDDEN_ID):
            callback, _ = self._waiting_hidden.pop(ident, (None, 0.0))
            if callback is not None:
                callback(msg)
            self.release()
            return
        out: Message | None = msg
        if "event" in msg:
            if msg["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                job = self.world.jobs.get(msg.get("data", {}).get("device"))
                if job is not None:
                    job.ended = True
            for rule in self.rules:
                out = rule.event(self, out) if out is not None else None
            if self._hold is not None and self._hold[0](msg):
                self._hold = None
        elif "QMP" not in msg and self._commands:  # a reply: to the oldest command
            command = self._commands.popleft()
            for rule in self.rules:
                out = rule.reply(self, command, out) if out is not None else None
        if out is not None and self.client_open:
            self._send(self.client_sock, out)
        self.release()


# ------------------------------------------------------------- process plumbing
def qmp_chardev(args: list[str]) -> tuple[int, int] | None:
    """(index of the value, fd) of the socket chardev a QMP monitor uses, if any."""
    monitors = set()
    for i, a in enumerate(args[:-1]):
        v = args[i + 1]
        if (a == "-object" and v.startswith("monitor-qmp,")) or \
                (a == "-mon" and "mode=control" in v):
            monitors |= {p.split("=", 1)[1] for p in v.split(",") if p.startswith("chardev=")}
    for i, a in enumerate(args[:-1]):
        v = args[i + 1]
        opts = dict(p.split("=", 1) for p in v.split(",")[1:] if "=" in p)
        if a == "-chardev" and v.startswith("socket,") and opts.get("id") in monitors \
                and "fd" in opts:
            return i + 1, int(opts["fd"])
    return None


def _passed_fds(args: list[str]) -> list[int]:
    return [int(m) for a in args for m in re.findall(r"(?:^|,)fd=(\d+)", a)]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Runs in the child before exec: SIGKILL it when the proxy dies, even if the proxy
    died before the signal was armed."""
    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return arm


def _exit_like(status: int) -> None:
    """Exit with QEMU's status, or die of QEMU's signal (no core file of the proxy)."""
    sys.stderr.flush()
    if status >= 0:
        os._exit(status)
    sig = -status
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def run(config: dict[str, Any], args: list[str]) -> None:
    qemu = str(config["qemu"])
    found = qmp_chardev(args)
    if found is None:
        os.execv(qemu, [qemu, *args])
    index, caller_fd = found
    names = list(config.get("rules", []))
    world = World()
    for i, a in enumerate(args[:-1]):
        if a == "-blockdev" and args[i + 1].startswith("{"):
            world.learn_node(json.loads(args[i + 1]))
    args = rewrite_args(names, args)
    ours, theirs = socket.socketpair()
    args[index] = re.sub(r"fd=\d+", f"fd={theirs.fileno()}", args[index])
    fds = [f for f in _passed_fds(args) if f != caller_fd] + [theirs.fileno()]
    children: list[subprocess.Popen[bytes]] = []

    def forward(sig: int, _frame: object) -> None:
        for c in children:
            c.send_signal(sig)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen([qemu, *args], pass_fds=fds,
                                 preexec_fn=_die_with_parent(os.getpid()))
    except OSError as exc:
        note(f"cannot start {qemu}: {exc.strerror}; rebuild the simulated build "
             "(python -m harness.simulate build ...)")
        os._exit(127)
    children.append(child)
    theirs.close()
    os.set_inheritable(caller_fd, False)
    client = socket.socket(fileno=caller_fd)
    relay = Relay(client, ours, [RULES[n]() for n in names], world)
    _relay_until_exit(relay, child)


def _relay_until_exit(relay: Relay, child: subprocess.Popen[bytes]) -> None:
    sel = selectors.DefaultSelector()
    try:
        sel.register(os.pidfd_open(child.pid), selectors.EVENT_READ, "exit")
        poll_interval = 1.0
    except (AttributeError, OSError):  # no pidfd (old kernel): poll the child
        poll_interval = 0.05
    sel.register(relay.client_sock, selectors.EVENT_READ, "client")
    sel.register(relay.qemu_sock, selectors.EVENT_READ, "qemu")
    qemu_open = True
    while True:
        events = sel.select(timeout=poll_interval)
        if not events and child.poll() is not None:
            events = [(selectors.SelectorKey(None, -1, 0, "exit"), 0)]  # type: ignore[arg-type]
        for key, _ in events:
            if key.data == "exit":
                # QEMU is gone: pass on what it said last, then leave as it did.
                relay.qemu_sock.setblocking(False)
                try:
                    while qemu_open and (data := relay.qemu_sock.recv(65536)):
                        relay.feed(relay.qemu_sock.fileno(), data)
                except OSError:
                    pass
                _exit_like(child.wait())
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                relay.feed(sock.fileno(), data)
            elif key.data == "client":  # the caller hung up: so does QEMU's monitor
                sel.unregister(sock)
                relay.client_open = False
                with contextlib.suppress(OSError):
                    relay.qemu_sock.shutdown(socket.SHUT_WR)
            else:
                sel.unregister(sock)
                qemu_open = False
                with contextlib.suppress(OSError):
                    relay.client_sock.shutdown(socket.SHUT_RDWR)
        relay.release()  # a hold may have timed out


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        sys.exit("usage: python -m harness.qemu.qmp_proxy CONFIG.json -- <qemu arguments>")
    with open(argv[0]) as fh:
        config = json.load(fh)
    unknown = set(config.get("rules", [])) - set(RULES)
    if unknown:
        sys.exit(f"{argv[0]}: unknown rules {sorted(unknown)}; known: {', '.join(RULES)}")
    run(config, argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
