"""A blkdebug fault in the copy-before-write path, and the rules that make it."""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .blkdebug import BlkdebugRules, InjectError, blkdebug_node, load
from .data import GUEST_WRITES

SITES = ("none", "target-write", "source-read", "both")


@dataclass(frozen=True)
class Fault:
    """A blkdebug fault in the copy-before-write path.

    ``site``: ``target-write`` (the copy's write to the target), ``source-read``
    (the copy's read of the old data), ``both``, or ``none`` (the control run).
    ``once``: only the first guest write's copy fails; otherwise every copy of
    the guest-written regions fails, so the job's own copy of them fails too.
    ``config``: the rules come from a blkdebug config file instead (see
    :meth:`from_config`), given to blkdebug as that file or, ``inline``, as QMP.
    """

    site: str = "none"
    once: bool = True
    errno: int = errno_mod.EIO
    config: Path | None = None  # the rules of this blkdebug config file replace the built ones
    inline: bool = True         # with config: send the file's rules inline, else the file itself
    immediately: bool = False   # the request fails at once, without yielding (no I/O at all)

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown fault site {self.site!r}")

    @classmethod
    def from_config(cls, path: Path, *, inline: bool,
                    valid_events: Collection[str] | None = None) -> Fault:
        """The fault of a ``configs/*.conf`` file: one inject-error rule, whose event says
        where it goes (``read_aio``: under the source, ``write_aio``: under the target).

        Unlike the built rules, a file's rule names no sector: it fails the next
        matching I/O on the node, whatever the region.
        """
        rules = load(path, valid_events)
        sites = {"read_aio": "source-read", "write_aio": "target-write"}
        if len(rules.inject_error) != 1 or rules.set_state or \
                rules.inject_error[0].event not in sites:
            raise ConfigError(f"{path}: a copy-before-write fault file holds one [inject-error] "
                              f"rule on read_aio (source) or write_aio (target)")
        rule = rules.inject_error[0]
        return cls(sites[rule.event], once=rule.once, errno=rule.errno, config=Path(path),
                   inline=inline)

    @property
    def name(self) -> str:
        if self.site == "none":
            return "no-fault"
        if self.config is not None:
            return f"{self.config.name} ({'inline' if self.inline else 'config file'})"
        return (f"{self.site}-{'once' if self.once else 'always'}-"
                f"{errno_mod.errorcode.get(self.errno, self.errno)}"
                + ("-immediately" if self.immediately else ""))

    @property
    def injects(self) -> bool:
        return self.site != "none"

    def _rules(self, event: str, iotype: str) -> BlkdebugRules:
        # iotype: an armed rule would otherwise fail any I/O on the node (the guest's
        # own write to the source, a flush), not only the copy-before-write's.
        return BlkdebugRules([InjectError(event, iotype=iotype, errno=self.errno,
                                          sector=off // 512, once=self.once,
                                          immediately=self.immediately)
                              for off in self.failing_writes()])

    def blkdebug(self, role: str, node_name: str, image: Mapping[str, Any]) -> dict[str, Any]:
        """The blkdebug node ``node_name`` under the ``source`` or ``target`` node, with
        this fault's rules if it strikes there (none otherwise: blkdebug then passes
        I/O through)."""
        event, iotype, sites = {"source": ("read_aio", "read", ("source-read", "both")),
                                "target": ("write_aio", "write", ("target-write", "both"))}[role]
        rules: BlkdebugRules | None = None
        config: Path | None = None
        if self.site in sites:
            if self.config is None:
                rules = self._rules(event, iotype)
            elif self.inline:
                rules = load(self.config)
            else:
                config = self.config
        return blkdebug_node(node_name, image, rules, config)

    def failing_writes(self) -> tuple[int, ...]:
        """Guest write offsets whose copy-before-write meets the fault."""
        if not self.injects:
            return ()
        return GUEST_WRITES[:1] if self.once else GUEST_WRITES


NO_FAULT = Fault()
