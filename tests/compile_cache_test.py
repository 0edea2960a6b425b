"""Compiled programs kept between runs (``trainer.compile_cache``): where, whose choice wins, and a
second run that loads its train step instead of compiling it."""

import json
import os
import subprocess
import sys

import jax
import pytest

from trainer import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\n"


def test_the_default_directory_names_this_hosts_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    fp = compile_cache.host_fingerprint()
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert compile_cache.default_dir("runs/x") == str(tmp_path / ".cache" / "flax_ift" / "xla" / fp)
    # another instruction set, another directory: a CPU program is machine code for its CPU
    assert (compile_cache.host_fingerprint(CPUINFO.format(extra="avx512f"))
            != compile_cache.host_fingerprint(CPUINFO.format(extra="")))
    assert (compile_cache.host_fingerprint(CPUINFO.format(extra=""))
            == compile_cache.host_fingerprint(CPUINFO.format(extra="") + "other processors differ"))
    # a pod's gs:// workdir: the restarted hosts find the programs there
    assert compile_cache.default_dir("gs://bucket/runs/x/") == "gs://bucket/runs/x/compile_cache"


@pytest.fixture
def jax_cache_config():
    """This process's cache settings, put back after the test."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_configure_uses_the_default_unless_the_user_chose(monkeypatch, tmp_path, jax_cache_config, capsys):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.configure() == jax.config.jax_compilation_cache_dir  # the user's, untouched
    assert not (tmp_path / ".cache").exists()

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    path = compile_cache.configure("runs/x")
    assert path == compile_cache.default_dir() and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES

    # a directory that cannot be made: one warning line, and the run compiles uncached
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "file"))
    assert compile_cache.configure() == ""
    assert jax.config.jax_compilation_cache_dir is None
    err = capsys.readouterr().err
    assert err.startswith("warning: no compilation cache (") and err.count("\n") == 1, err


def _train(tmp_path, name, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    # the tiny model compiles in well under JAX's 1-second threshold for writing an entry
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py", "--jax_log_compiles", *extra]
    if "--dry_run" not in extra:
        cmd += ["--workdir", str(tmp_path / name)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows if "train/loss" in r or "val/loss" in r]


@pytest.mark.slow
def test_a_second_run_loads_its_train_step_from_the_cache(tmp_path):
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    first = _train(tmp_path, "a")
    assert hit not in first.stderr
    cache = tmp_path / "home" / ".cache" / "flax_ift" / "xla"
    [host] = os.listdir(cache)
    assert any(f.startswith("jit_train_step-") for f in os.listdir(cache / host))
    second = _train(tmp_path, "b")
    assert hit in second.stderr, second.stderr[-4000:]
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")  # the same run, bit for bit


def test_a_dry_run_compiles_afresh(tmp_path):
    """It reports what its compiles cost (and their memory and FLOP analyses): nothing cached."""
    _train(tmp_path, "", "--dry_run")
    assert not (tmp_path / "home" / ".cache" / "flax_ift" / "xla").exists()
