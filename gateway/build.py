"""Which build runs: the version (one source, ``gateway.__version__``) and the git revision.

The revision comes from ``ISALES_GATEWAY_REVISION`` (the image sets it from its build
argument), else from the ``.git`` directory of a source checkout, else ``unknown``. Read once
at start-up, without running ``git``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REVISION_VARIABLE = "ISALES_GATEWAY_REVISION"
_SHA = re.compile(r"^[0-9a-f]{7,64}$")


def revision(environ: dict[str, str] | None = None, root: Path | None = None) -> str:
    env = os.environ if environ is None else environ
    given = env.get(REVISION_VARIABLE, "").strip().lower()
    if _SHA.match(given):
        return given
    found = _git_head(root or Path(__file__).resolve().parents[1])
    return found or "unknown"


def _git_head(root: Path) -> str | None:
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if _SHA.match(head) else None
        ref = head.removeprefix("ref: ")
        common = git / "commondir"
        base = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for directory in (git, base):
            if (directory / ref).is_file():
                sha = (directory / ref).read_text().strip()
                return sha if _SHA.match(sha) else None
        for line in (base / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.match(sha):
                return sha
    except (OSError, IndexError):
        return None
    return None
