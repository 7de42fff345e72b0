"""bench/source_digest.py: the build sources' digest that results files and GPU-round reports carry
beside the commit (the device's copy of a tree may carry a stale .git). It must change with any
byte or name of a source, and only with sources."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from source_digest import source_digest, source_files  # noqa: E402


def _tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_digest_follows_sources_only(tmp_path):
    root = str(tmp_path)
    _tree(root, {"setup.py": "x = 1\n", "CMakeLists.txt": "project(p)\n",
                 "csrc/kernels/a.cu": "__global__ void k() {}\n", "csrc/include/dms/b.h": "#pragma once\n"})
    d0 = source_digest(root)
    assert len(d0) == 12 and int(d0, 16) >= 0
    assert source_digest(root) == d0                                   # deterministic
    assert source_files(root) == ["CMakeLists.txt", "csrc/include/dms/b.h", "csrc/kernels/a.cu", "setup.py"]
    _tree(root, {"csrc/kernels/a.o": "binary", "README.md": "docs", "csrc/__pycache__/c.py": "x"})
    assert source_digest(root) == d0                                   # build outputs, docs: no
    _tree(root, {"csrc/kernels/a.cu": "__global__ void k() { }\n"})     # one byte more
    d1 = source_digest(root)
    assert d1 != d0
    os.rename(os.path.join(root, "csrc/kernels/a.cu"), os.path.join(root, "csrc/kernels/a2.cu"))
    assert source_digest(root) not in (d0, d1)                         # a name is part of it
    _tree(root, {"setup.py": "x = 2\n"})
    assert source_digest(root) != d1


def test_digest_of_this_checkout_is_stable():
    assert source_digest() == source_digest()
    assert any(f.startswith("csrc/kernels/") and f.endswith(".cu") for f in source_files())
