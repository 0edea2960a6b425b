"""The cache root (``data_pipeline.user_cache``): XDG's rule, one place for the tokenised splits and the
compiled programs."""

import os

from data_pipeline import pipeline
from data_pipeline.user_cache import user_cache_dir
from trainer import compile_cache


def test_the_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_cache_dir("xla") == str(tmp_path / "home" / ".cache" / "flax_ift" / "xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the spec: a relative path is ignored
    assert user_cache_dir() == str(tmp_path / "home" / ".cache" / "flax_ift")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "flax_ift"
    assert compile_cache.default_dir("runs/x") == str(root / "xla" / compile_cache.host_fingerprint())

    class Data:
        cache_dir = ""
    assert pipeline._cache_dir(Data()) == str(root / "tokenized")
    Data.cache_dir = "~/mine"  # the user's own, as given
    assert pipeline._cache_dir(Data()) == os.path.join(str(tmp_path / "home"), "mine")
