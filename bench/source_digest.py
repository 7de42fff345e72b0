"""A digest of the sources a build is made from (csrc/, setup.py, CMakeLists.txt): the first 12 hex
digits of a SHA-256 over each file's path and bytes, in path order. Results files and GPU-round
reports carry it beside the commit, so a reader can tell which tree produced the numbers (the
device's copy of a working tree may carry a stale .git, and GIT_COMMIT is whatever the caller
typed); recompute it on a checkout to compare:

    python3 bench/source_digest.py [ROOT]

No torch: gpu_round.sh calls it before anything is installed.
"""
from __future__ import annotations

import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_EXTS = (".cu", ".cuh", ".h", ".hpp", ".cpp", ".cc", ".txt", ".py")


def source_files(root: str = ROOT) -> list:
    """Paths (relative, '/'-separated, sorted) of the files the digest covers."""
    out = [f for f in ("setup.py", "CMakeLists.txt") if os.path.isfile(os.path.join(root, f))]
    for d, dirs, files in os.walk(os.path.join(root, "csrc")):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        for f in files:
            if f.endswith(SOURCE_EXTS):
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def source_digest(root: str = ROOT) -> str:
    h = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:12]


if __name__ == "__main__":
    print(source_digest(sys.argv[1] if len(sys.argv) > 1 else ROOT))
