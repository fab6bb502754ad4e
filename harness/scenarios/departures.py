"""The registry of recorded departures: where QEMU does not do what it documents.

Each departure is declared here once.  Tests name it (``@pytest.mark.departure(name)``);
the plugin turns the mark into a strict expected failure whose reason is generated
from the entry and names the QEMU version under test, and a fixed QEMU turns it into
a failure reading ``departure fixed: <name>``.  The README's list is generated from
this module too (:func:`readme_list`), and a self-test keeps the two in step.

Sources quoted: QAPI ``OnCbwError`` and ``BackupCommon`` (qapi/block-core.json) and
the commit that added ``blockdev-backup`` ``on-cbw-error`` (3d3911f16b, QEMU 10.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QEMUDied, QEMUUnresponsive

Version = tuple[int, ...]


@dataclass(frozen=True)
class Departure:
    """One recorded departure of QEMU from its documentation."""

    name: str               # the slug tests and reports use
    title: str              # one line: the case
    documented: str         # what the documentation promises (quoted, briefly)
    observed: str           # what QEMU does instead
    seen_on: tuple[str, ...]  # QEMU versions it was observed on
    fixed_in: Version | None = None  # it applies to builds before this version; None: to all
    raises: type[Exception] | None = None  # the xfail holds only for this exception

    def applies_to(self, version: Version) -> bool:
        """Is it expected on a build of this version?  Those that apply to every build
        (the tests' capability marks decide where they can run) make a user's fixed build
        XPASS; one fixed upstream applies to the builds before the fix only."""
        return self.fixed_in is None or tuple(version[:len(self.fixed_in)]) < self.fixed_in

    def xfail_reason(self, version: str) -> str:
        """The reason of the strict xfail on the build under test."""
        return f"departure {self.name}: {self.title}: QEMU {version} {self.observed}"

    def fixed_message(self, version: str) -> str:
        """What a strict XPASS says: the departure is gone on this build."""
        return (f"departure fixed: {self.name}: on QEMU {version} the test's checks of the "
                f"documented behaviour pass ({self.documented}); it no longer {self.observed}. "
                f"Record the fix in harness/scenarios/departures.py (fixed_in) or drop the "
                f"departure.")


_BREAK_SNAPSHOT_DOC = ("QAPI OnCbwError break-snapshot: \"any backup or export process based "
                       "on it will finally fail\"; seed commit: \"invalidates the snapshot and "
                       "aborts related jobs\"")

DEPARTURES: tuple[Departure, ...] = (
    Departure(
        name="sync-full-broken-snapshot-completes",
        title="blockdev-backup sync=full + break-snapshot + a one-shot copy-before-write "
              "failure",
        documented=_BREAK_SNAPSHOT_DOC,
        observed="lets the job complete without error, its backup holding the guest's new "
                 "data instead of the point-in-time data",
        seen_on=("11.1.3",)),
    Departure(
        name="sync-none-broken-snapshot-runs-on",
        title="blockdev-backup sync=none + break-snapshot + a copy-before-write failure "
              "(also under a real guest)",
        documented=_BREAK_SNAPSHOT_DOC,
        observed="keeps the job running after the snapshot broke, and its cancel ends it like "
                 "a good backup (BLOCK_JOB_CANCELLED, no error) though its target lacks the "
                 "old data of the overwritten regions",
        seen_on=("11.1.3",)),
    Departure(
        name="ignore-on-broken-snapshot-livelocks",
        title="a backup job with on-source-error=ignore, at full speed, whose reads fail at "
              "once: a push backup from a fleecing snapshot broken by break-snapshot, or any "
              "backup whose source fails reads without I/O (blkdebug immediately)",
        documented="QAPI BlockdevOnError ignore: \"ignore the error, only report a QMP event\"; "
                   "the job retries and QEMU keeps serving QMP, so the job can be cancelled",
        observed="livelocks: the job retries the failing read without yielding (~150,000 "
                 "BLOCK_JOB_ERROR/s), QEMU answers no QMP command (not even quit) and ignores "
                 "SIGTERM; only SIGKILL ends it",
        seen_on=("11.1.3", "10.0.13", "7.2.22"),
        raises=QEMUUnresponsive),
    Departure(
        name="cbw-timeout-wraps",
        title="copy-before-write cbw-timeout above ~4.29 s",
        documented="QAPI cbw-timeout: \"Non-zero sets the timeout in seconds for "
                   "copy-before-write operation\"",
        observed="wraps the timeout (nanoseconds in a uint32_t: 10 s -> 1.41 s, 30 s -> "
                 "4.23 s), so a copy well within the timeout fails with 'Connection timed out'",
        seen_on=("7.2.22",),
        fixed_in=(9, 1)),
    Departure(
        name="snapshot-read-leaving-copied-cluster",
        title="a snapshot-access read that starts in a copied cluster and goes on into one "
              "not copied",
        documented="the snapshot-access driver (QAPI BlockdevDriver, since 7.0) on a "
                   "copy-before-write filter is the fleecing scheme's reader: it sees the "
                   "filter's disk as it was when the filter was added (paraphrased)",
        observed="reads the whole request from the source, not the copied part from the "
                 "target: the reader gets the guest's new data for the copied cluster, or "
                 "the source's read error where the source now fails there (reads that "
                 "end inside the copied cluster are right)",
        seen_on=("7.2.22",),
        fixed_in=(10, 0)),
    Departure(
        name="snapshot-discard-unaligned-aborts",
        title="a discard on the snapshot-access node that is not aligned to the "
              "copy-before-write's cluster size",
        documented="a discard of any byte range is a valid request (qemu-io discard, NBD "
                   "TRIM); the copy-before-write snapshot discards the clusters it covers "
                   "whole (QAPI blockdev-backup discard-source, since 9.1, relies on it)",
        observed="aborts (hbitmap_reset: Assertion `QEMU_IS_ALIGNED(start, gran)' failed)",
        seen_on=("7.2.22",),
        fixed_in=(9, 1),  # "block/copy-before-write: support unaligned snapshot-discard",
        # in the series that added discard-source
        raises=QEMUDied),
    Departure(
        name="fleecing-export-follows-backup-filter",
        title="blockdev-backup whose device is a fleecing copy-before-write node (a second "
              "copy-before-write filter on the disk, above the first)",
        documented="the snapshot-access driver (QAPI BlockdevDriver, since 7.0) on a "
                   "copy-before-write filter is the fleecing scheme's reader: it sees the "
                   "filter's disk as it was when the filter was added (paraphrased); "
                   "blockdev-backup's device is the node to copy",
        observed="puts the job's filter above every parent of the node, the snapshot-access "
                 "node too: the fleecing export then reads the backup's snapshot, not its "
                 "own (the guest's writes made between the fleecing and the backup show, and "
                 "a fleecing snapshot broken by break-snapshot still serves data)",
        seen_on=("11.1.3", "10.0.13", "7.2.22")),
)

_BY_NAME = {d.name: d for d in DEPARTURES}


def get(name: str) -> Departure:
    """The departure called ``name``; a clear error naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown departure {name!r}: record it in "
                       f"harness/scenarios/departures.py (known: {', '.join(_BY_NAME)})"
                       ) from None


def readme_list() -> str:
    """The README's list of recorded departures, one bullet each (generated; a self-test
    checks that the README holds exactly this)."""
    lines = []
    for d in DEPARTURES:
        where = (f"builds before {'.'.join(map(str, d.fixed_in))}" if d.fixed_in
                 else "every build that can run it")
        lines.append(f"- `{d.name}`: {d.title}: QEMU {d.observed}. Documented: {d.documented}. "
                     f"Seen on {', '.join(d.seen_on)}; expected on {where}.")
    return "\n".join(lines) + "\n"
