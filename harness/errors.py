"""One exception hierarchy for the harness, rooted in :class:`HarnessError`.

Every message is meant to be read on one line: what went wrong, and what to do.
Errors about a QEMU process also carry what is needed to reproduce it by hand.
"""

from __future__ import annotations

from collections.abc import Sequence


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


class ConfigError(HarnessError):
    """Bad input from the user: a missing binary, an unreadable config, a bad option."""


class ProvisionError(HarnessError):
    """A QEMU build or guest kernel could not be fetched or unpacked."""


class LockTimeout(HarnessError):
    """Another process held a lock (on a cache, or a run shared by tests) past the limit."""


class MissingCapability(HarnessError):
    """The build under test lacks something a test needs."""


class CommandFailed(HarnessError):
    """QEMU answered a QMP command with an error: QEMU itself is fine (as
    ``qemu.qmp``'s ``ExecuteError``).  Not a :class:`QEMUError`: code that handles a
    dead or hung QEMU must not catch a refused command."""

    def __init__(self, command: str, arguments: dict[str, object], error_class: str,
                 desc: str) -> None:
        self.command = command
        self.arguments = arguments  # not 'args': that is BaseException's, and gets overwritten
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class QEMUError(HarnessError):
    """The QEMU process itself misbehaved (did not start, died, hung, exited
    abnormally) or an awaited event did not come; carries its context."""

    def __init__(self, message: str, *, cmdline: Sequence[str] = (),
                 log_tail: str = "", exitcode: int | None = None):
        self.message = message
        self.cmdline = list(cmdline)
        self.log_tail = log_tail
        self.exitcode = exitcode
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.log_tail:
            parts.append("QEMU's last output:\n  " + self.log_tail.rstrip().replace("\n", "\n  "))
        return "\n".join(parts)


class LaunchFailure(QEMUError):
    """QEMU exited or failed before the QMP handshake completed."""


class QEMUDied(QEMUError):
    """QEMU exited (or was killed) while the harness was waiting on it."""


class QEMUUnresponsive(QEMUError):
    """QEMU is alive but did not answer within the time limit (hung, livelocked or stopped)."""


class WaitTimeout(QEMUError):
    """An awaited event or state did not come in time, while QEMU kept answering."""


class AbnormalShutdown(QEMUError):
    """QEMU ended on a signal or a non-zero exit status, or ignored ``quit`` and had to
    be killed (as ``QEMUMachine.shutdown()``'s ``AbnormalShutdown``)."""


def describe_exit(code: int | None) -> str:
    """'exit status 1' / 'killed by signal 9 (SIGKILL)' from a Popen returncode."""
    import signal
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"killed by signal {-code} ({name})"
    return f"exit status {code}"
