"""Find and stop test beds whose state directory is gone (`python -m tests.testbed down` does it).

A test bed started from a clone that was later deleted still runs: its control plane, and maybe a
real node holding the machine's node lock. Two things outlive the directory and name it:

- the test bed's record, `testbed.json` in its run directory (`Testbed.run_dir`, under /run): a copy
  of its state, with the PIDs and binaries of every component and what the real node changed;
- a real node's lock file, whose text names the test bed holding it.

A test bed is an orphan when its directory holds no `state.json` any more. Stopping one is the
ordinary stop (`Testbed.stop`, which tears a real node down) read from the record, then a sweep
for any process left whose command line still names the directory (what a test bed started by an
older version, with no record, left running).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.cluster import RECORD, Testbed, _alive, _terminate, run_parent
from tests.testbed.node import lock_directory, lock_owner


@dataclass(frozen=True)
class Orphan:
    """A test bed whose state directory is gone: where it was, and its record if it left one."""

    directory: Path
    record: Path | None


def _orphaned(directory: Path) -> bool:
    return not (directory / "state.json").exists()


def find() -> list[Orphan]:
    """Every orphaned test bed this machine records, from the run directories and the node locks."""
    found: dict[Path, Orphan] = {}
    for record in sorted(run_parent().glob(f"edgemodel-*/{RECORD}")):
        try:
            directory = Path(json.loads(record.read_text())["directory"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _orphaned(directory):
            found[directory] = Orphan(directory, record)
    locks = lock_directory()
    for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        with contextlib.suppress(OSError):
            owner = lock_owner(lock.read_text())
            if owner is not None and owner not in found and _orphaned(owner) and _processes_naming(owner):
                found[owner] = Orphan(owner, None)
    return list(found.values())


def _processes_naming(directory: Path) -> list[int]:
    """PIDs of the processes (not this one) whose command line names a path under `directory`."""
    needle = f"{directory}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(needle in argument or argument == needle[:-1] for argument in command.split(b"\0")):
            pids.append(int(entry.name))
    return pids


def stop(orphan: Orphan, timeout: float = 15) -> None:
    """Stop an orphaned test bed: from its record if it has one, then whatever still names its directory."""
    if orphan.record is not None and orphan.record.exists():
        Testbed(orphan.directory, state_path=orphan.record).stop(timeout)
    for pid in _processes_naming(orphan.directory):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                _terminate(pid, timeout)


def stop_all(log: Callable[[str], None] = print) -> list[Path]:
    """Stop every orphaned test bed; returns the directories they ran from."""
    stopped = []
    for orphan in find():
        log(f"stopping the test bed whose directory {orphan.directory} is gone ...")
        stop(orphan)
        stopped.append(orphan.directory)
    return stopped
