"""The one path abstraction of a run's files: local paths and ``gs://`` buckets alike.

Every file of a workdir -- ``config.json``, ``run.lock``, ``tokenizer/``, ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` (Orbax, which speaks ``etils.epath`` and TensorStore itself), eval
reports, exports -- goes through here. ``etils.epath`` does the work (locally ``pathlib``; for
``gs://`` the ``gcsfs`` filesystem), as Orbax does, so a pod's hosts share one workdir in a bucket
instead of each writing its own disk.

Three things a bucket does not do the way a disk does, and what we do instead:
  * append: ``metrics.jsonl`` and TensorBoard events are written to a local mirror
    (``local_mirror``) and uploaded whole at each checkpoint and at the end. A crash loses only rows
    past the last checkpoint -- exactly the rows a resume drops anyway;
  * rename: an object write is atomic already, so ``write_text`` writes in place remotely (and
    through a temporary file + rename locally);
  * libraries that want a local directory (a tokenizer's ``save_pretrained``/``from_pretrained``,
    safetensors) get one: ``download_dir`` / ``upload_dir``.

With ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore, under Orbax)
set, ``gs://`` goes to a GCS emulator instead (the tests start one on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from etils import epath


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def free_space(p: Any) -> str:
    """The free space of ``p``'s local filesystem, for an error line ("unknown" for a bucket)."""
    try:
        return f"{shutil.disk_usage(p).free / 1e9:.2f} GB"
    except OSError:
        return "unknown"


def abspath(path: str) -> str:
    """Local paths made absolute; remote ones as they are (``os.path.abspath`` would turn
    ``gs://b/run`` into ``./gs:/b/run``)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(*parts: Any) -> str:
    if is_remote(parts[0]):
        return "/".join([str(parts[0]).rstrip("/"), *(str(p).strip("/") for p in parts[1:])])
    return os.path.join(*map(str, parts))


def path(p: Any) -> epath.Path:
    return epath.Path(str(p))


def exists(p: Any) -> bool:
    return path(p).exists()


def isdir(p: Any) -> bool:
    return path(p).is_dir()


def isfile(p: Any) -> bool:
    return path(p).is_file()


def listdir(p: Any) -> list[str]:
    d = path(p)
    return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def makedirs(p: Any) -> None:
    if not is_remote(p):  # a bucket has no directories: an object's name makes its "parents"
        os.makedirs(p, exist_ok=True)


def read_text(p: Any) -> str:
    return path(p).read_text()


def write_text(p: Any, text: str) -> None:
    """Writes ``text`` so that no reader ever sees half of it: a temporary file and a rename
    locally; one object upload (atomic) remotely."""
    if is_remote(p):
        path(p).write_text(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, p)


def write_bytes(p: Any, data: bytes) -> None:
    if not is_remote(p):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    path(p).write_bytes(data)


def remove(p: Any) -> None:
    q = path(p)
    if q.exists():
        q.unlink()


def rename(src: Any, dst: Any) -> None:
    """A file or a whole directory (remotely: copied, then the source deleted)."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    s = path(src)
    if s.is_dir():
        s.copytree(path(dst))
        s.rmtree()
    else:
        s.rename(path(dst))


def upload_dir(local: str, remote: str) -> None:
    """Copies a local directory's files under ``remote`` (replacing what is there by name)."""
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local)
            dst = path(join(remote, *rel.split(os.sep)))
            dst.write_bytes(open(src, "rb").read())


def download_dir(remote: str, local: str) -> str:
    """Copies ``remote``'s files (recursively) into ``local``; returns ``local``."""
    def walk(r: epath.Path, l: str) -> None:
        os.makedirs(l, exist_ok=True)
        for c in r.iterdir():
            if c.is_dir():
                walk(c, os.path.join(l, c.name))
            else:
                with open(os.path.join(l, c.name), "wb") as f:
                    f.write(c.read_bytes())
    walk(path(remote), local)
    return local


def local_mirror(p: str) -> str:
    """A local directory standing for ``p``: ``p`` itself when local; for a remote path, a directory
    under the temp dir named by its hash (the same one for the same path on this host)."""
    if not is_remote(p):
        return p
    key = hashlib.sha256(str(p).encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "flax_ift_mirror", key)
    os.makedirs(d, exist_ok=True)
    return d


def fresh_local_dir(p: str) -> str:
    """An empty local directory for ``p`` (see ``local_mirror``): ``p`` when local."""
    d = local_mirror(p)
    if is_remote(p) and os.path.isdir(d):
        shutil.rmtree(d)
        os.makedirs(d)
    return d


REMOTE_NOTE = ".flax_ift_remote"  # in a local copy: the remote directory it was copied from


def local_copy(remote: str, skip: tuple[str, ...] = ()) -> str:
    """A local copy of a remote directory or file (``remote`` itself when local) for readers that need local
    files (transformers' tokenizer and config, safetensors), minus the subdirectories named in
    ``skip`` (a converted base's ``params``, which Orbax reads from the bucket itself, by chunk).
    Made once per host and path: written under a temporary name, then renamed into place, so
    processes sharing a host never see half a copy. ``REMOTE_NOTE`` in it names the source."""
    if not is_remote(remote):
        return remote
    key = hashlib.sha256(str(remote).encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "flax_ift_remote", key)
    if os.path.isfile(os.path.join(d, REMOTE_NOTE)):
        return d

    def walk(r: epath.Path, local: str) -> None:
        os.makedirs(local, exist_ok=True)
        for c in r.iterdir():
            if c.is_dir():
                if c.name not in skip:
                    walk(c, os.path.join(local, c.name))
            else:
                with open(os.path.join(local, c.name), "wb") as f:
                    f.write(c.read_bytes())
    os.makedirs(os.path.dirname(d), exist_ok=True)
    if path(remote).is_file():  # a GGUF file: copied into the directory, which stands for it
        single = os.path.join(d, path(remote).name)
        if os.path.isfile(single):
            return single
        os.makedirs(d, exist_ok=True)
        part = f"{single}.{os.getpid()}.part"
        with open(part, "wb") as f:
            f.write(path(remote).read_bytes())
        os.replace(part, single)
        return single
    tmp = tempfile.mkdtemp(dir=os.path.dirname(d))
    walk(path(remote), tmp)
    with open(os.path.join(tmp, REMOTE_NOTE), "w") as f:
        f.write(str(remote))
    try:
        os.rename(tmp, d)
    except OSError:  # another process of this host finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def source_of(local: str) -> str:
    """The remote directory a ``local_copy`` came from (``local`` itself for any other directory)."""
    note = os.path.join(local, REMOTE_NOTE)
    return open(note).read().strip() if os.path.isfile(note) else local
