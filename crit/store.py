"""The results directory: chunked, atomic, resumable. The only module of crit that writes files.

Layout of an experiment's ``out_dir``::

    config.json          every flag, the protocol fingerprint, package versions, devices
    chunks/chunk_<first init>_<count>.npz   per-init arrays of one finished chunk
    results.csv          one row per init (assembled from the chunks)
    spectra.npz          raw eigenvalues, one row per init
    curves.npz           training and finder curves, one row per init
    *.png, *.pdf         figures

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either a whole chunk or
none. A rerun of the same command finds the finished chunks, computes only the missing inits and
assembles the same outputs. Files are read with ``allow_pickle=False``; a chunk that cannot be
read, or that repeats an init, is reported by name and never used.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CONFIG = "config.json"
LOCK = ".lock"
CHUNK_DIR = "chunks"
CHUNK_RE = re.compile(r"^chunk_(\d{7})_(\d{6})\.npz$")
# What crit itself writes; --overwrite removes these and nothing else.
OWNED_NAMES = {CONFIG, CHUNK_DIR, "results.csv", "spectra.npz", "curves.npz"}
OWNED_SUFFIXES = (".png", ".pdf")


class ResultsDirError(ValueError):
    """The output directory cannot be used as asked (the message says why and what to do)."""


_UMASK = os.umask(0)
os.umask(_UMASK)
# Results directories this process holds the lock of (open file objects, kept until exit).
_HELD_LOCKS: dict[str, object] = {}


def _owned(name: str, extra: Iterable[str] = ()) -> bool:
    return (name in OWNED_NAMES or name in extra or name.endswith(OWNED_SUFFIXES)
            or name.startswith(".tmp") or name == LOCK)


def fsync_dir(folder: Path) -> None:
    """Flush a directory's entries to disk: a rename is durable only once its directory is.

    Without it a power loss or kernel crash (not a SIGKILL, which the page cache survives) can
    lose a chunk that was renamed into place.
    """
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``;
    the file and then the directory are fsynced, so a finished write survives a crash."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: collaborators could not read results
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def lock_out_dir(out: Path) -> None:
    """Take the exclusive lock of results directory ``out`` for the rest of this process.

    A second run (another command, another SLURM task, a process of another multi-process run)
    started into the same directory while this one holds the lock is refused with
    :class:`ResultsDirError` naming the holder, before it reads or writes anything. The lock is
    an ``flock`` on ``out/.lock``, released by the kernel when the process ends (also on
    SIGKILL), so a killed run never leaves a stale lock. ``flock`` is reliable on local disks
    and on most cluster file systems (Lustre, GPFS, NFSv4); see BUILD.md.
    """
    key = str(Path(out).resolve())
    if key in _HELD_LOCKS:
        return
    fh = open(Path(out) / LOCK, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown process"
        fh.close()
        raise ResultsDirError(f"--out_dir={out} is in use by another run ({holder}); wait for it "
                              "to finish or choose another --out_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    fh.flush()
    _HELD_LOCKS[key] = fh


def environment_changes(old: Mapping | None, new: Mapping | None) -> list[str]:
    """What differs between two config.json ``environment`` records in what can change numbers:
    crit's version, Python's, the matmul precision and the package versions (devices and process
    count may differ: results are the same across them, see crit.parallel)."""
    old, new = dict(old or {}), dict(new or {})
    changes = []
    for key in ("crit", "python", "matmul_precision"):
        if key in old and key in new and old[key] != new[key]:
            changes.append(f"{key} {old[key]} -> {new[key]}")
    po, pn = old.get("packages") or {}, new.get("packages") or {}
    for pkg in sorted(set(po) & set(pn)):
        if po[pkg] != pn[pkg]:
            changes.append(f"{pkg} {po[pkg]} -> {pn[pkg]}")
    return changes


def read_config(out_dir: str | Path) -> dict | None:
    """config.json of ``out_dir`` (None if absent); a damaged one raises ResultsDirError."""
    path = Path(out_dir) / CONFIG
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsDirError(f"{path} is damaged ({exc}); pass --overwrite to start over") from exc


def check_config(out_dir: str | Path, config: Mapping) -> None:
    """Raise ResultsDirError unless ``out_dir/config.json`` holds ``config``'s fingerprint
    (``protocol``) and environment: what a process that did not write config.json checks before
    it computes into ``out_dir``."""
    old = read_config(out_dir)
    if old is None:
        raise ResultsDirError(f"--out_dir={out_dir} has no {CONFIG}")
    _check_same_run(Path(out_dir), old, config)


def _check_same_run(out: Path, old: Mapping, config: Mapping) -> None:
    new_protocol = json.loads(json.dumps(config["protocol"], default=str))
    if old.get("protocol") != new_protocol:
        raise ResultsDirError(f"--out_dir={out} holds results of a different configuration "
                              f"({_diff(old.get('protocol', {}), config['protocol'])}); pass "
                              "--overwrite to replace them or choose another --out_dir")
    changes = environment_changes(old.get("environment"), config.get("environment"))
    if changes:
        raise ResultsDirError(f"--out_dir={out} holds results computed with other versions "
                              f"({'; '.join(changes)}); resuming would mix them. Pass "
                              "--overwrite to recompute, or finish with the versions in its "
                              f"{CONFIG}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to memory, then :func:`atomic_write_bytes` (object arrays are refused)."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"refusing to store object array {key!r} (it would need pickle)")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` without pickle; any failure is re-raised naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # damaged, truncated or foreign file
        raise ResultsDirError(f"cannot read {path}: {exc}. Delete it to recompute it.") from exc


def prepare_out_dir(out_dir: str | Path, config: Mapping, overwrite: bool = False,
                    outputs: Iterable[str] = (), chunked: bool = True) -> bool:
    """Check ``out_dir`` before any compute and write ``config.json``; return True if resuming.

    ``config["protocol"]`` is the fingerprint: everything that changes numbers. A directory that
    already holds a run with the same fingerprint and the same versions (crit, Python, packages:
    ``config["environment"]``) is resumed, and its config.json is kept as it was; a different
    configuration or a version change is refused unless ``overwrite`` (which removes only files
    crit writes). Files crit did not write are never removed: such a directory is refused. The
    directory's lock (:func:`lock_out_dir`) is taken first and held until the process ends, so
    a second run into the same directory is refused while this one runs. ``outputs`` names the app's own data files (besides
    config.json, figures and the standard results), so a rerun may replace them; ``chunked``
    creates the ``chunks/`` folder of resumable apps.
    """
    outputs = tuple(outputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ResultsDirError(f"--out_dir={out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsDirError(f"--out_dir={out} cannot be created: {exc.strerror}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ResultsDirError(f"--out_dir={out} is not writable")
    lock_out_dir(out)
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    foreign = [n for n in entries if not _owned(n, outputs)]
    if foreign:
        raise ResultsDirError(f"--out_dir={out} holds files crit did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new "
                              "directory")
    resuming = False
    if entries:
        if overwrite:
            clear_owned(out, outputs)
        else:
            old = read_config(out)
            if old is None:
                raise ResultsDirError(f"--out_dir={out} holds results without a {CONFIG}; pass "
                                      "--overwrite to replace them or choose another --out_dir")
            _check_same_run(out, old, config)
            resuming = True
    if chunked:
        (out / CHUNK_DIR).mkdir(exist_ok=True)
    if not resuming:
        atomic_write_text(out / CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str))
    return resuming


def _diff(old: Mapping, new: Mapping) -> str:
    new = json.loads(json.dumps(new))
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changed[:4]) or "no config.json"


def clear_owned(out: Path, outputs: Iterable[str] = ()) -> None:
    """Remove the files and chunk folder crit writes in ``out`` (nothing else)."""
    outputs = tuple(outputs)
    for p in out.iterdir():
        if not _owned(p.name, outputs) or p.name == LOCK:
            continue
        if p.is_dir():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()
        else:
            p.unlink()


def chunk_path(out_dir: str | Path, first_id: int, count: int) -> Path:
    return Path(out_dir) / CHUNK_DIR / f"chunk_{first_id:07d}_{count:06d}.npz"


def write_chunk(out_dir: str | Path, records: Mapping[str, np.ndarray]) -> Path:
    """Store one finished chunk (a dict of per-init arrays with an ``init_id`` column)."""
    ids = np.asarray(records["init_id"])
    path = chunk_path(out_dir, int(ids[0]), len(ids))
    atomic_save_npz(path, records)
    return path


def load_chunks(out_dir: str | Path) -> dict[str, np.ndarray]:
    """All finished chunks merged and sorted by ``init_id`` ({} if none).

    Raises :class:`ResultsDirError` naming the file for a damaged chunk, a chunk whose contents do
    not match its name, a foreign file in ``chunks/``, or an init stored twice.
    """
    folder = Path(out_dir) / CHUNK_DIR
    if not folder.is_dir():
        return {}
    parts = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".tmp"):
            continue  # an interrupted write: never finished, never used
        match = CHUNK_RE.match(path.name)
        if not match:
            raise ResultsDirError(f"unexpected file {path} in the chunk folder; remove it")
        data = load_npz(path)
        ids = data.get("init_id")
        if ids is None or len(ids) != int(match.group(2)) or int(ids[0]) != int(match.group(1)):
            raise ResultsDirError(f"chunk {path} does not hold the inits its name says; "
                                  "delete it to recompute it")
        short = [k for k, v in data.items() if v.ndim == 0 or v.shape[0] != len(ids)]
        if short:
            raise ResultsDirError(f"chunk {path} is damaged: fields {short} do not have one row "
                                  f"per init ({len(ids)}); delete it to recompute it")
        parts.append(data)
    if not parts:
        return {}
    keys = set(parts[0])
    for data, path in zip(parts, sorted(folder.glob("chunk_*.npz"))):
        if set(data) != keys:
            raise ResultsDirError(f"chunk {path} has fields {sorted(data)}, expected "
                                  f"{sorted(keys)}; delete it to recompute it")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    order = np.argsort(merged["init_id"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    ids = merged["init_id"]
    if len(np.unique(ids)) != len(ids):
        dup = ids[np.flatnonzero(np.diff(ids) == 0)[0]]
        raise ResultsDirError(f"init {dup} is stored in two chunk files under {folder}")
    return merged


def missing_ids(done: Iterable[int], num_inits: int) -> np.ndarray:
    """Init ids in ``range(num_inits)`` that no finished chunk holds, ascending."""
    done_set = set(int(i) for i in done)
    return np.array([i for i in range(num_inits) if i not in done_set], dtype=np.int64)


def write_csv(path: str | Path, columns: Mapping[str, np.ndarray]) -> None:
    """One row per entry of the equal-length arrays in ``columns``; floats at full precision."""
    names = list(columns)
    n = len(next(iter(columns.values())))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for i in range(n):
        row = []
        for name in names:
            value = columns[name][i]
            if isinstance(value, (float, np.floating)):
                row.append(repr(float(value)))
            else:
                row.append(str(value.item() if hasattr(value, "item") else value))
        writer.writerow(row)
    atomic_write_text(Path(path), buffer.getvalue())


def read_csv(path: str | Path) -> dict[str, list[str]]:
    """Columns of a CSV written by :func:`write_csv`, as lists of strings."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    return {name: [r[j] for r in body] for j, name in enumerate(header)}
