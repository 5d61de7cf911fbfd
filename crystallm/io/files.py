"""Walking an input folder safely: regular files only, of bounded size, inside the folder unless links may be
followed; every other entry is refused with its reason and the batch goes on (docs/evaluation.md, "Inputs")."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from crystallm.errors import CrystaLLMInputError

MAX_FILE_BYTES = 64 * 1024 * 1024  # a CIF of the largest cells is a few MB; a bigger "CIF" is something else


@dataclass(frozen=True)
class InputPolicy:
    """What an input walk may read: links leading out of the folder given (`follow_links`), files up to
    `max_bytes`."""

    follow_links: bool = False
    max_bytes: int = MAX_FILE_BYTES


@dataclass(frozen=True)
class Refused:
    """An entry of a folder that was not read, and why."""

    name: str
    reason: str


def check_file(path: Path, inside: Path | None = None, policy: InputPolicy = InputPolicy()) -> str | None:
    """Why `path` may not be read, or None: a link leading outside the folder `inside` (unless the policy follows
    links), a dangling or looping link, anything but a regular file (a folder, a named pipe, a device), more bytes
    than the policy allows.

    >>> check_file(Path("/dev/zero"))
    'not a regular file (a character device)'
    """
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return "a link to nothing" if path.is_symlink() else "no such file"
    except (RuntimeError, OSError):  # RuntimeError: a link loop on older Pythons
        return "a link loop"
    outside = inside is not None and path.is_symlink() and not target.is_relative_to(inside.resolve())
    if outside and not policy.follow_links:
        return f"a link leading outside {inside} (to {target}); pass --follow-links to read it"
    mode = os.stat(target).st_mode
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device",
                 stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
        return f"not a regular file ({kind})"
    size = os.stat(target).st_size
    if size > policy.max_bytes:
        return f"{size:,} bytes, more than the limit of {policy.max_bytes:,} (--max-file-mb)"
    return None


def read_bytes(path: Path, inside: Path | None = None, policy: InputPolicy = InputPolicy()) -> bytes:
    """The bytes of a file that `check_file` allows, never more than the policy's limit; CrystaLLMInputError naming
    the file and the reason otherwise."""
    reason = check_file(path, inside, policy)
    if reason:
        raise CrystaLLMInputError(f"{path}: {reason}")
    with open(path, "rb") as handle:
        content = handle.read(policy.max_bytes + 1)
    if len(content) > policy.max_bytes:  # grew since it was looked at
        raise CrystaLLMInputError(f"{path}: more than the limit of {policy.max_bytes:,} bytes (--max-file-mb)")
    return content


def folder_files(folder: Path, suffixes: tuple[str, ...], policy: InputPolicy = InputPolicy(),
                 ) -> tuple[list[Path], list[Refused], list[str]]:
    """The readable files of `folder` with one of `suffixes` (sorted), the entries refused with their reasons, and
    the names of the other files (not structure files: a README, a license)."""
    readable, refused, others = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in suffixes:
            if path.is_file():
                others.append(path.name)
            continue
        reason = check_file(path, folder, policy)
        if reason:
            refused.append(Refused(path.name, reason))
        else:
            readable.append(path)
    return readable, refused, others
