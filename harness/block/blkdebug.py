"""blkdebug error-injection rules: a typed model, QEMU's config-file format, and QMP.

blkdebug is QEMU's rule-based error injector.  A rule names a *debug event* that a
format driver raises on its ``file`` child (``read_aio``, ``write_aio``, ...) and what
to do when it fires: ``inject-error`` arms an error for the next matching I/O on the
blkdebug node; ``set-state`` moves blkdebug's state machine (states start at 1).
So in this harness blkdebug always sits *under* the format node::

    qcow2 (node "tgt") --file--> blkdebug (node "tgt-dbg") --image--> file (node "tgt-file")

The same rules can reach QEMU two ways, and this module speaks both:

* inline, in ``blockdev-add`` (:meth:`BlkdebugRules.to_qmp`, :func:`blkdebug_node`);
* as a config file named by blkdebug's ``config`` option (:func:`load`, :func:`render`),
  QEMU's own ini-like format read by ``qemu_config_parse()``::

      [inject-error]
      event = "write_aio"
      errno = "5"
      once = "on"

Example::

    rules = fail_once("write_aio", iotype="write", errno=errno.ENOSPC)
    node = blkdebug_node("tgt-dbg", "tgt-file", rules)
    qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": node})

What QEMU accepts, checked against QEMU's ``block/blkdebug.c`` and on Debian's 7.2,
10.0 and 11.1 builds:

* QMP (``BlkdebugInjectErrorOptions``): event, state, iotype (4.1+), errno,
  delay-ns (10.0+), sector, once, immediately.  ``BlkdebugSetStateOptions``: event,
  state, new_state (required).
* The config file takes the same keys under the same names (``iotype`` too, and
  ``delay-ns`` on 10.0+), every value a double-quoted string.  Its parser is crude:
  a comment needs ``#`` in column 1, a blank line must be truly empty, the key must
  be followed by a space before ``=``, numbers are read by ``strtoull(base 0)``
  (so ``"034"`` is octal 28), anything after the closing quote is ignored, a
  repeated key silently overrides, ``new_state`` may be left out (then 0), and its
  errors carry no line number ("parse error").  :func:`parse` is deliberately
  stricter than QEMU on every one of these points, so a file it accepts means the
  same thing to QEMU, and it names ``file:line`` for every problem.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from errno import EIO
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "INJECT_ERROR_KEYS",
    "IOTYPES",
    "SET_STATE_KEYS",
    "BlkdebugRules",
    "InjectError",
    "SetState",
    "blkdebug_node",
    "fail_always",
    "fail_once",
    "load",
    "parse",
    "render",
    "validate",
]

# QAPI BlkdebugIOType.  Fixed here because the loader must check iotype without a
# build; validate() can narrow it to what a given build's schema lists.
IOTYPES: tuple[str, ...] = ("read", "write", "write-zeroes", "discard", "flush", "block-status")

# Keys of each config-file section, in QAPI member order (also the render order).
INJECT_ERROR_KEYS: tuple[str, ...] = (
    "event", "state", "iotype", "errno", "delay-ns", "sector", "once", "immediately")
SET_STATE_KEYS: tuple[str, ...] = ("event", "state", "new_state")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "inject-error": INJECT_ERROR_KEYS,
    "set-state": SET_STATE_KEYS,
}

# Syntax only (QAPI enum values); whether the build knows the event is validate()'s job.
_EVENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# No sign, no leading zero: QEMU reads numbers with strtoull(base 0), so "034" is octal.
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")
_SECTION_RE = re.compile(r"\[([^\]]*)\][ \t]*")
# QEMU scans ' %63s = "%1023[^"]"': the key ends at whitespace, so a space before '='
# is required; the value is double-quoted and cannot contain a quote.
_KEY_VALUE_RE = re.compile(r'[ \t]*([^\s=]+)[ \t]+=[ \t]*"([^"]*)"[ \t]*')
# QEMU reads lines with fgets() into a 1024-byte buffer: longer lines get split.
_MAX_LINE = 1022


class _FieldError(ConfigError):
    """A ConfigError about one member, so the file loader can point at that key's line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _check_int(where: str, key: str, value: int | None, minimum: int, hint: str = "") -> None:
    """Raise unless value is None or an int >= minimum; ``key`` is the QAPI member name."""
    if value is None:
        return
    # bool is an int subclass; True as an errno is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(key, f"{where}: {key} must be an integer, got {value!r}")
    if value < minimum:
        raise _FieldError(key, f"{where}: {key} must be >= {minimum}, got {value}{hint}")


def _check_event(kind: str, event: str) -> None:
    if not isinstance(event, str) or not _EVENT_RE.fullmatch(event):
        raise _FieldError("event", f"{kind} rule: event {event!r} is not a blkdebug event "
                                   f"name (use a BlkdebugEvent value such as 'write_aio')")


_ANY_STATE_HINT = " (blkdebug states start at 1; leave state out to match any state)"


@dataclass(frozen=True)
class InjectError:
    """One ``inject-error`` rule (QAPI ``BlkdebugInjectErrorOptions``).

    When ``event`` fires (in ``state``, if given), the rule is armed and the next I/O
    on the blkdebug node of a matching ``iotype`` (default: read, write,
    write-zeroes, discard, flush) touching ``sector`` (default: any) fails with
    ``-errno``, after ``delay_ns`` if given.  ``once`` disarms the rule after one
    error; without it every later matching I/O fails.  ``immediately`` returns the
    error without first yielding the coroutine.  ``errno=0`` injects no error and
    only makes sense with ``delay_ns`` (a slow, successful I/O).

    >>> InjectError("write_aio", iotype="write", once=True).to_qmp()
    {'event': 'write_aio', 'iotype': 'write', 'errno': 5, 'once': True}
    """

    event: str
    state: int | None = None
    iotype: str | None = None
    errno: int = EIO
    delay_ns: int | None = None
    sector: int | None = None
    once: bool = False
    immediately: bool = False

    def __post_init__(self) -> None:
        _check_event("inject-error", self.event)
        where = f"inject-error rule for event '{self.event}'"
        _check_int(where, "state", self.state, 1, _ANY_STATE_HINT)
        if self.iotype is not None and self.iotype not in IOTYPES:
            raise _FieldError("iotype", f"{where}: unknown iotype {self.iotype!r}; "
                                        f"valid iotypes: {', '.join(IOTYPES)}")
        _check_int(where, "delay-ns", self.delay_ns, 0)
        # errno 0 makes QEMU skip the rule: only useful as a pure delay.
        _check_int(where, "errno", self.errno, 0 if self.delay_ns else 1,
                   " (errno 0 injects nothing; it is only allowed together with delay-ns)")
        _check_int(where, "sector", self.sector, 0)
        for key in ("once", "immediately"):
            if not isinstance(getattr(self, key), bool):
                raise _FieldError(key, f"{where}: {key} must be True or False, "
                                       f"got {getattr(self, key)!r}")

    def to_qmp(self) -> dict[str, Any]:
        """QMP form; optional members left out when unset so older builds accept it."""
        d: dict[str, Any] = {"event": self.event}
        if self.state is not None:
            d["state"] = self.state
        if self.iotype is not None:
            d["iotype"] = self.iotype
        d["errno"] = self.errno  # always present: explicit in logs, known to every build
        if self.delay_ns is not None:
            d["delay-ns"] = self.delay_ns
        if self.sector is not None:
            d["sector"] = self.sector
        if self.once:
            d["once"] = True
        if self.immediately:
            d["immediately"] = True
        return d

    def _config_items(self) -> list[tuple[str, str]]:
        items = [("event", self.event)]
        if self.state is not None:
            items.append(("state", str(self.state)))
        if self.iotype is not None:
            items.append(("iotype", self.iotype))
        items.append(("errno", str(self.errno)))
        if self.delay_ns is not None:
            items.append(("delay-ns", str(self.delay_ns)))
        if self.sector is not None:
            items.append(("sector", str(self.sector)))
        # once is written even when off: it is what tells a reader one-shot from persistent.
        items.append(("once", "on" if self.once else "off"))
        if self.immediately:
            items.append(("immediately", "on"))
        return items


@dataclass(frozen=True)
class SetState:
    """One ``set-state`` rule (QAPI ``BlkdebugSetStateOptions``).

    When ``event`` fires while blkdebug is in ``state`` (any state if None), the state
    becomes ``new_state``.  All rules of one event see the state from before it.

    >>> SetState("read_aio", state=1, new_state=2).to_qmp()
    {'event': 'read_aio', 'state': 1, 'new_state': 2}
    """

    event: str
    new_state: int
    state: int | None = None

    def __post_init__(self) -> None:
        _check_event("set-state", self.event)
        where = f"set-state rule for event '{self.event}'"
        _check_int(where, "state", self.state, 1, _ANY_STATE_HINT)
        _check_int(where, "new_state", self.new_state, 1, " (blkdebug states start at 1)")

    def to_qmp(self) -> dict[str, Any]:
        """QMP form; ``state`` left out when it is "any"."""
        d: dict[str, Any] = {"event": self.event}
        if self.state is not None:
            d["state"] = self.state
        d["new_state"] = self.new_state
        return d

    def _config_items(self) -> list[tuple[str, str]]:
        items = [("event", self.event)]
        if self.state is not None:
            items.append(("state", str(self.state)))
        items.append(("new_state", str(self.new_state)))
        return items


@dataclass
class BlkdebugRules:
    """The rules of one blkdebug node.

    >>> BlkdebugRules.fail("write_aio", once=True, iotype="write").to_qmp()
    {'inject-error': [{'event': 'write_aio', 'iotype': 'write', 'errno': 5, 'once': True}]}
    """

    inject_error: list[InjectError] = field(default_factory=list)
    set_state: list[SetState] = field(default_factory=list)

    @classmethod
    def fail(cls, event: str, *, once: bool, errno: int = EIO, iotype: str | None = None,
             sector: int | None = None, skip: int = 0) -> BlkdebugRules:
        """Fail the I/O that follows ``event``: the first one only, or all from then on.

        ``skip`` lets the first ``skip`` occurrences of ``event`` pass (a chain of
        set-state rules), e.g. to spare a backup job's own first copy and hit the
        copy-before-write that comes after it.  It counts events, not requests.
        """
        _check_int(f"fail({event!r})", "skip", skip, 0)
        steps = [SetState(event, state=n, new_state=n + 1) for n in range(1, skip + 1)]
        rule = InjectError(event, state=skip + 1 if skip else None, iotype=iotype,
                           errno=errno, sector=sector, once=once)
        return cls([rule], steps)

    def events(self) -> set[str]:
        """Every event name the rules use."""
        return {r.event for r in self.inject_error} | {r.event for r in self.set_state}

    def to_qmp(self) -> dict[str, Any]:
        """The rule members of a blkdebug ``blockdev-add``; empty lists left out."""
        d: dict[str, Any] = {}
        if self.inject_error:
            d["inject-error"] = [r.to_qmp() for r in self.inject_error]
        if self.set_state:
            d["set-state"] = [r.to_qmp() for r in self.set_state]
        return d


def fail_once(event: str, *, errno: int = EIO, iotype: str | None = None,
              sector: int | None = None, skip: int = 0) -> BlkdebugRules:
    """Fail the one I/O that follows ``event`` (after ``skip`` occurrences pass)."""
    return BlkdebugRules.fail(event, once=True, errno=errno, iotype=iotype,
                              sector=sector, skip=skip)


def fail_always(event: str, *, errno: int = EIO, iotype: str | None = None,
                sector: int | None = None, skip: int = 0) -> BlkdebugRules:
    """Fail every matching I/O from the first ``event`` on (after ``skip`` pass)."""
    return BlkdebugRules.fail(event, once=False, errno=errno, iotype=iotype,
                              sector=sector, skip=skip)


def _names(valid: Collection[str]) -> str:
    return ", ".join(sorted(valid))


def _unknown_event(event: str, valid_events: Collection[str]) -> str:
    """'unknown blkdebug event ...' with a suggestion and the build's full list."""
    close = get_close_matches(event, list(valid_events), n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"unknown blkdebug event '{event}'{guess}; "
            f"this build's events: {_names(valid_events)}")


def validate(rules: BlkdebugRules, valid_events: Collection[str], *,
             valid_iotypes: Collection[str] | None = None,
             inject_error_members: Collection[str] | None = None) -> None:
    """Check rules against what one build supports; raise ConfigError on the first misfit.

    ``valid_events`` are the build's ``BlkdebugEvent`` values and ``valid_iotypes`` its
    ``BlkdebugIOType`` values; ``inject_error_members`` the member names of its
    ``BlkdebugInjectErrorOptions`` (7.2 has no ``delay-ns``).  All come from the
    build's ``query-qmp-schema``; the last two are checked only when given.
    """
    if not valid_events:
        raise ConfigError("the build's QMP schema lists no BlkdebugEvent values; "
                          "check that this QEMU has the blkdebug driver")
    kinds: list[tuple[str, Sequence[InjectError | SetState]]] = [
        ("inject-error", rules.inject_error), ("set-state", rules.set_state)]
    for kind, rule_list in kinds:
        for n, rule in enumerate(rule_list, 1):
            if rule.event not in valid_events:
                raise ConfigError(f"{kind} rule {n}: {_unknown_event(rule.event, valid_events)}")
    for n, r in enumerate(rules.inject_error, 1):
        if valid_iotypes is not None and r.iotype is not None and r.iotype not in valid_iotypes:
            raise ConfigError(f"inject-error rule {n}: iotype '{r.iotype}' is not supported by "
                              f"this build; its iotypes: {_names(valid_iotypes)}")
        if inject_error_members is not None:
            for member in r.to_qmp():
                if member not in inject_error_members:
                    raise ConfigError(f"inject-error rule {n} uses '{member}', which this "
                                      f"build's blkdebug lacks; drop it or use a newer QEMU")


@dataclass
class _Section:
    """One [section] while parsing: its values with the line each came from."""

    name: str
    line: int
    values: dict[str, tuple[str, int]] = field(default_factory=dict)


def _syntax_hint(line: str) -> str:
    if not line.strip():
        return "a blank line must be empty (QEMU's parser rejects whitespace-only lines)"
    if line.lstrip().startswith("#"):
        return "a comment must have '#' in the first column"
    if line.startswith("["):
        return "a section header is [inject-error] or [set-state] alone on its line"
    return ("expected key = \"value\": a space before '=', the value in double quotes, "
            "nothing after it")


def parse(text: str, source: str = "<string>",
          valid_events: Collection[str] | None = None) -> BlkdebugRules:
    """Parse QEMU's blkdebug config-file format; ``source`` names it in errors.

    With ``valid_events`` (the build's BlkdebugEvent values) event names are checked
    too; without, only their syntax.  Raises ConfigError naming ``source:line``.
    """
    sections: list[_Section] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for lineno, line in enumerate(lines, 1):
        where = f"{source}:{lineno}"
        if "\r" in line:
            raise ConfigError(f"{where}: carriage return (CRLF line ending); "
                              f"save the file with LF line endings")
        if len(line) > _MAX_LINE:
            raise ConfigError(f"{where}: line longer than {_MAX_LINE} characters, "
                              f"which QEMU's parser splits; shorten it")
        if line == "" or line.startswith("#"):
            continue
        if line.startswith("["):
            m = _SECTION_RE.fullmatch(line)
            if not m:
                raise ConfigError(f"{where}: malformed section header; {_syntax_hint(line)}")
            name = m.group(1)
            if '"' in name:
                raise ConfigError(f"{where}: section ids ([{name}]) are not supported; "
                                  f"write [inject-error] or [set-state]")
            if name not in _SECTIONS:
                raise ConfigError(f"{where}: unknown section [{name}]; "
                                  f"valid sections: [inject-error], [set-state]")
            sections.append(_Section(name, lineno))
            continue
        m = _KEY_VALUE_RE.fullmatch(line)
        if not m:
            raise ConfigError(f"{where}: syntax error; {_syntax_hint(line)}")
        key, value = m.groups()
        if not sections:
            raise ConfigError(f"{where}: key '{key}' before any section; "
                              f"start the rule with [inject-error] or [set-state]")
        section = sections[-1]
        valid_keys = _SECTIONS[section.name]
        if key not in valid_keys:
            raise ConfigError(f"{where}: unknown key '{key}' in [{section.name}]; "
                              f"valid keys: {', '.join(valid_keys)}")
        if key in section.values:
            raise ConfigError(f"{where}: duplicate key '{key}' in [{section.name}] "
                              f"(first on line {section.values[key][1]}); "
                              f"QEMU would keep only the last, so remove one")
        section.values[key] = (value, lineno)
    if not sections:
        raise ConfigError(f"{source}: defines no rules; add an [inject-error] "
                          f"or [set-state] section")
    rules = BlkdebugRules()
    for section in sections:
        rule = _build_rule(section, source, valid_events)
        if isinstance(rule, InjectError):
            rules.inject_error.append(rule)
        else:
            rules.set_state.append(rule)
    return rules


def _build_rule(section: _Section, source: str,
                valid_events: Collection[str] | None) -> InjectError | SetState:
    """Turn one parsed section into a rule, with file:line in every error."""
    values = section.values

    def at(key: str) -> str:
        return f"{source}:{values[key][1] if key in values else section.line}"

    def number(key: str) -> int | None:
        if key not in values:
            return None
        text = values[key][0]
        if not _DECIMAL_RE.fullmatch(text):
            raise ConfigError(f"{at(key)}: {key} must be a non-negative decimal integer "
                              f"without leading zeros (QEMU reads 0-prefixed numbers as "
                              f"octal), got \"{text}\"")
        return int(text)

    def flag(key: str) -> bool:
        if key not in values:
            return False
        text = values[key][0]
        if text not in ("on", "off"):
            raise ConfigError(f"{at(key)}: {key} must be \"on\" or \"off\", got \"{text}\"")
        return text == "on"

    if "event" not in values:
        raise ConfigError(f"{source}:{section.line}: [{section.name}] rule has no event; "
                          f"add a line like event = \"write_aio\"")
    event = values["event"][0]
    if valid_events is not None and event not in valid_events:
        raise ConfigError(f"{at('event')}: {_unknown_event(event, valid_events)}")
    try:
        if section.name == "inject-error":
            iotype = values["iotype"][0] if "iotype" in values else None
            errno = number("errno")
            return InjectError(
                event, state=number("state"), iotype=iotype,
                errno=EIO if errno is None else errno, delay_ns=number("delay-ns"),
                sector=number("sector"), once=flag("once"), immediately=flag("immediately"))
        new_state = number("new_state")
        if new_state is None:
            # QEMU would default to 0, which no state-specific rule ever matches.
            raise ConfigError(f"{source}:{section.line}: [set-state] rule has no new_state; "
                              f"add a line like new_state = \"2\"")
        return SetState(event, state=number("state"), new_state=new_state)
    except _FieldError as e:
        # The model checks the values; point at the line of the key it names.
        raise ConfigError(f"{at(e.key)}: {e}") from None


def load(path: Path | str, valid_events: Collection[str] | None = None) -> BlkdebugRules:
    """Read a blkdebug config file; see :func:`parse`.  Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read blkdebug config {path}: {e.strerror or e}; "
                          f"check the path and its permissions") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"blkdebug config {path} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start}); save it as plain text") from None
    return parse(text, str(path), valid_events)


def render(rules: BlkdebugRules, header: str | None = None) -> str:
    """QEMU's config-file text for ``rules``; :func:`parse` gives back equal rules.

    ``header`` becomes ``#`` comment lines at the top.  inject-error sections come
    before set-state ones, which is no loss: QEMU loads all of the first kind first.
    """
    if not rules.inject_error and not rules.set_state:
        raise ConfigError("cannot render a blkdebug config without rules; "
                          "add an inject-error or set-state rule")
    out: list[str] = []
    if header:
        out += [f"# {line}".rstrip() for line in header.strip("\n").split("\n")]
    kinds: list[tuple[str, Sequence[InjectError | SetState]]] = [
        ("inject-error", rules.inject_error), ("set-state", rules.set_state)]
    for name, rule_list in kinds:
        for rule in rule_list:
            if out:
                out.append("")
            out.append(f"[{name}]")
            out += [f'{key} = "{value}"' for key, value in rule._config_items()]
    return "\n".join(out) + "\n"


def blkdebug_node(node_name: str, image_child: Mapping[str, Any] | str,
                  rules: BlkdebugRules | None = None,
                  config_path: Path | str | None = None) -> dict[str, Any]:
    """A blkdebug ``blockdev-add`` dict, to use as a format node's ``file`` child.

    ``image_child`` is the protocol node below it: a node-name or an inline dict.
    Rules come inline (``rules``), from a config file (``config_path``, made absolute
    because QEMU resolves it against its own working directory), or both: QEMU then
    loads the file's rules and the inline ones together.  With neither, blkdebug
    passes I/O through untouched.

    >>> node = blkdebug_node("dbg", "img", fail_once("write_aio"))
    >>> node["driver"], node["node-name"], node["image"]
    ('blkdebug', 'dbg', 'img')
    >>> node["inject-error"]
    [{'event': 'write_aio', 'errno': 5, 'once': True}]
    """
    if not node_name:
        raise ConfigError("blkdebug node needs a node-name; pass a non-empty node_name")
    node: dict[str, Any] = {"driver": "blkdebug", "node-name": node_name,
                            "image": image_child if isinstance(image_child, str)
                            else dict(image_child)}
    if config_path is not None:
        config = Path(config_path).absolute()
        if not config.is_file():
            raise ConfigError(f"blkdebug config {config} does not exist or is not a file; "
                              f"check the path")
        node["config"] = str(config)
    if rules is not None:
        node.update(rules.to_qmp())
    return node
