"""Building the CPU kernels on first use: the cache, and one-line errors without a compiler or on a compile error."""
import os

import pytest

from pangu_moe.ops import build


def test_library_is_cached_by_source_hash():
    first = build.library_path()
    stamp = os.stat(first).st_mtime_ns
    assert build.library_path() == first and os.stat(first).st_mtime_ns == stamp
    assert os.path.dirname(first).startswith(str(build.CACHE_DIR))


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "CACHE_DIR", tmp_path)  # nothing cached: a build is needed
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.KernelBuildError, match=r"needs a C\+\+17 compiler \(g\+\+\).*runtime.kernels = reference"):
        build.library_path()


def test_compile_error_names_the_first_error_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "src" / "cpu").mkdir(parents=True)
    (tmp_path / "src" / "cpu" / "broken.cc").write_text("int f() { return undefined_name; }\n")
    monkeypatch.setattr(build, "KERNELS_DIR", tmp_path / "src")
    monkeypatch.setattr(build, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(build.KernelBuildError, match="building kernels/cpu failed: .*undefined_name"):
        build.library_path()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial library left


def test_missing_sources_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "KERNELS_DIR", tmp_path)
    with pytest.raises(build.KernelBuildError, match="no kernel sources"):
        build.library_path()
