"""A researcher's own checkpoint: read it without pickle, match it to the model leaf by leaf.

Formats (:data:`CHECKPOINT_FORMATS`, told apart by :func:`checkpoint_format`):

* ``orbax``   -- a directory written by ``orbax.checkpoint`` (``StandardCheckpointer``,
  ``PyTreeCheckpointer``), or one step of a ``CheckpointManager`` (a directory holding one
  item directory such as ``default`` or ``state``). Restored without a target, straight to
  NumPy on the host: nothing is placed on a device and nothing is cast (see below).
* ``npz``     -- a ``*.npz`` file whose keys are ``/``-joined paths (``params/Dense_0/kernel``),
  as :func:`save_npz` writes it.
* ``msgpack`` -- any other file: ``flax.serialization.to_bytes`` / ``msgpack_serialize`` output.

Paths. Every leaf is named by the keys leading to it, joined by ``/`` (:func:`flat_paths`):
dict keys as ``str``, list and tuple positions as their index, dataclass and named-tuple
fields by name. A linen ``variables`` dict gives ``params/Dense_0/kernel`` and
``batch_stats/BatchNorm_0/mean``; an NNX state (through ``nnx.to_pure_dict``) gives
``lin/kernel``. :func:`match_checkpoint` takes each leaf the model expects from the checkpoint
by that path, and collects every problem (missing, extra, wrong shape, wrong kind of dtype)
into one :class:`CheckpointError` raised before any compute: a partial match is never used.
Orbax saves an NNX state with one more level per variable (``lin/kernel/value``); that level
is stripped on reading, so a model with a variable literally named ``value`` as the only
variable of its module is matched one level up.

Why no pickle. A pickle runs code when it is read, so a checkpoint from someone else's
machine could do anything. npz is read with ``allow_pickle=False`` (an object array is
refused), msgpack holds only data, and Orbax stores arrays in TensorStore. Leaves keep the
checkpoint's dtype: the caller decides on a cast and records it.

Orbax, version notes (orbax-checkpoint 0.12.8, jax 0.10.2): ``StandardCheckpointer().restore``
without a target returns jax arrays for arrays saved from jax, so with ``jax_enable_x64`` off
a float64 leaf silently comes back float32 and an int64 leaf is truncated to int32. Reading
therefore goes through the checkpoint's metadata and restores every leaf with
``restore_type=np.ndarray``, which keeps the stored dtype exactly.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from crit.store import atomic_write_bytes

CHECKPOINT_FORMATS = ("orbax", "msgpack", "npz")

# Files that mark a directory as one Orbax pytree item (the OCDBT manifest, the tree
# metadata, or the single ``checkpoint`` file of pre-OCDBT versions).
_ORBAX_ITEM_MARKERS = ("_METADATA", "manifest.ocdbt", "checkpoint")
# A fixed zip timestamp, so the same tree always gives the same .npz bytes (and hash).
_NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match the model.

    ``problems`` holds one line per problem found (empty for a read error), so a caller can
    show or count them; the message lists them all.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


# --------------------------------------------------------------------------- paths


def _key_name(key) -> str:
    """The path element of one ``jax.tree_util`` key entry: a dict key, index or field name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _as_plain_tree(tree):
    """An ``nnx.State`` as its pure dict; any other pytree unchanged."""
    try:
        from flax import nnx
    except ImportError:  # flax absent: no State can have been passed
        return tree
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


def flat_paths(tree) -> dict[str, object]:
    """Every leaf of a pytree by its ``/``-joined path.

    Parameters
    ----------
    tree
        A nested dict, flax ``FrozenDict``, ``nnx.State`` (taken as ``nnx.to_pure_dict``),
        lists, tuples, named tuples or dataclass pytrees of arrays. ``None`` and empty
        containers hold no leaves.

    Returns
    -------
    dict
        ``{"params/Dense_0/kernel": leaf, ...}``: dict keys as ``str``, sequence positions as
        their index, fields by name.

    Raises
    ------
    CheckpointError
        If two leaves give the same path (a key that itself contains ``/``).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(_as_plain_tree(tree))
    flat: dict[str, object] = {}
    for key_path, leaf in leaves:
        path = "/".join(_key_name(k) for k in key_path)
        if path in flat:
            raise CheckpointError(f"two leaves share the path {path!r}: a key contains '/'")
        flat[path] = leaf
    return flat


def _nest(flat: Mapping[str, np.ndarray], source: str) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``; a path that is both a leaf and a prefix is an error."""
    tree: dict = {}
    for path in sorted(flat):
        *parents, name = path.split("/")
        node = tree
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"{source}: {'/'.join(parents[:i + 1])} is both a leaf and a prefix of {path}")
        if name in node:
            raise CheckpointError(f"{source}: {path} is both a leaf and a prefix of other keys")
        node[name] = flat[path]
    return tree


def _strip_value_level(tree):
    """Arrays for ``{"value": array}`` dicts (NNX variables as Orbax saves them); lists kept."""
    if isinstance(tree, Mapping):
        if len(tree) == 1 and "value" in tree and not isinstance(tree["value"], Mapping):
            return _strip_value_level(tree["value"])
        return {str(k): _strip_value_level(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _strip_value_level(v) for i, v in enumerate(tree)}
    if tree is None:
        return {}
    return np.asarray(tree)


# --------------------------------------------------------------------------- reading


def checkpoint_format(path) -> str:
    """The format of a checkpoint, from what ``path`` is.

    Returns
    -------
    str
        ``"orbax"`` for a directory, ``"npz"`` for a file ending in ``.npz``, ``"msgpack"``
        for any other file.

    Raises
    ------
    CheckpointError
        If nothing exists at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        return "orbax"
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file or directory there")
    return "npz" if path.suffix.lower() == ".npz" else "msgpack"


def _orbax_item_dir(path: Path) -> Path:
    """The directory of the one Orbax pytree item at ``path`` (itself, or a step's item dir)."""
    def is_item(folder: Path) -> bool:
        return any((folder / marker).is_file() for marker in _ORBAX_ITEM_MARKERS)

    if is_item(path):
        return path
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    items = [p for p in subdirs if is_item(p)]
    if len(items) == 1:
        return items[0]
    if items:
        names = ", ".join(p.name for p in items)
        raise CheckpointError(f"{path}: several Orbax items ({names}); pass the directory "
                              f"of the one that holds the model, e.g. {items[0]}")
    steps = [p.name for p in subdirs if p.name.isdigit()]
    if steps:
        raise CheckpointError(f"{path}: a CheckpointManager directory with steps "
                              f"{', '.join(sorted(steps, key=int))}; pass one step's "
                              f"directory, e.g. {path / max(steps, key=int)}")
    raise CheckpointError(f"{path}: not an Orbax checkpoint (none of "
                          f"{', '.join(_ORBAX_ITEM_MARKERS)} in it or in one item below it)")


def _read_orbax(path: Path) -> dict:
    """An Orbax item restored as NumPy arrays with their stored dtypes (no target needed)."""
    import orbax.checkpoint as ocp

    item = _orbax_item_dir(path).resolve()
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item)
    # 0.12: StepMetadata -> .item_metadata (TreeMetadata) -> .tree; older: the tree itself.
    metadata = getattr(metadata, "item_metadata", metadata)
    metadata = getattr(metadata, "tree", metadata)
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _read_npz(path: Path) -> dict:
    """An ``.npz`` of ``/``-joined paths as a nested dict, read without pickle."""
    flat = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            try:
                flat[key] = archive[key]
            except ValueError as err:  # an object array needs pickle: refused
                raise CheckpointError(f"{path}: leaf {key!r} cannot be read without pickle "
                                      f"({err}); store plain numeric arrays") from None
    return _nest(flat, str(path))


def _read_msgpack(path: Path) -> dict:
    """A flax msgpack file as a nested dict."""
    from flax import serialization

    return serialization.msgpack_restore(path.read_bytes())


_READERS = {"orbax": _read_orbax, "npz": _read_npz, "msgpack": _read_msgpack}


def read_checkpoint(path) -> dict:
    """The nested dict of NumPy arrays stored at ``path``, in any of :data:`CHECKPOINT_FORMATS`.

    Parameters
    ----------
    path
        An Orbax directory, an ``.npz`` file or a flax msgpack file (:func:`checkpoint_format`).

    Returns
    -------
    dict
        Nested dicts with ``np.ndarray`` leaves in the stored dtype (scalars as 0-d arrays).
        Lists become dicts keyed ``"0"``, ``"1"``, ... (as flax's msgpack stores them), and
        a ``{"value": array}`` level per NNX variable is stripped.

    Raises
    ------
    CheckpointError
        If nothing is at ``path`` or it cannot be read as its format; the message names it.
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    try:
        raw = _READERS[fmt](path)
    except CheckpointError:
        raise
    except Exception as err:  # any reader's failure becomes one message naming the file
        raise CheckpointError(f"{path}: cannot be read as an {fmt} checkpoint: "
                              f"{type(err).__name__}: {err}") from err
    tree = _strip_value_level(raw)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a single array, not a tree of named leaves")
    return tree


# --------------------------------------------------------------------------- matching


def _dtype_kind(dtype) -> str:
    """The kind of a dtype that a cast may not cross: bool, integer, floating, complex.

    ``jnp.issubdtype`` rather than NumPy's, so bfloat16 and the other ml_dtypes count as
    floating; any other dtype (e.g. a typed PRNG key) is its own kind.
    """
    for kind, base in (("bool", jax.numpy.bool_), ("integer", jax.numpy.integer),
                       ("floating", jax.numpy.floating),
                       ("complex", jax.numpy.complexfloating)):
        if jax.numpy.issubdtype(dtype, base):
            return kind
    return str(dtype)


def _template_spec(leaf) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of a template leaf: an array, a ``jax.ShapeDtypeStruct`` or a scalar."""
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    dtype = getattr(leaf, "dtype", None)
    return shape, np.asarray(leaf).dtype if dtype is None else dtype


def _problem_report(problems: list[str]) -> str:
    count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
    return f"checkpoint does not match the model ({count}):\n  " + "\n  ".join(problems)


def match_checkpoint(raw: dict, template, *,
                     allow_extra: Optional[Callable[[str], bool]] = None):
    """Every leaf of ``template`` taken from ``raw`` by its path, or one error listing all problems.

    Parameters
    ----------
    raw
        A checkpoint as :func:`read_checkpoint` returns it (any pytree :func:`flat_paths` reads).
    template
        The model's pytree: arrays or ``jax.ShapeDtypeStruct`` leaves (anything with
        ``.shape``), e.g. linen ``variables`` or ``jax.eval_shape(module.init, ...)``, or an
        NNX pure dict / ``nnx.State`` (a State is matched as its pure dict).
    allow_extra
        ``path -> bool`` for checkpoint leaves the model need not have (e.g.
        ``lambda p: p.startswith("rngs/")``); every other leaf the model lacks is an error.

    Returns
    -------
    pytree
        The template's structure (an ``nnx.State`` template gives its pure dict) with the
        checkpoint's ``np.ndarray`` leaves in the checkpoint's dtype: float32 stays float32.

    Raises
    ------
    CheckpointError
        Listing, in this order, each ``missing: <path> (model expects shape ...)``,
        ``extra: <path> (checkpoint has shape ...)``, ``shape mismatch: <path>: checkpoint
        ..., model ...`` and ``dtype mismatch: <path>: checkpoint ..., model ...`` (a
        different kind: bool, integer, floating, complex). ``.problems`` holds the lines.
    """
    plain = _as_plain_tree(template)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(plain)
    paths = ["/".join(_key_name(k) for k in key_path) for key_path, _ in leaves]
    stored = flat_paths(raw)
    allow_extra = allow_extra or (lambda _: False)

    missing, shapes, dtypes, matched = [], [], [], []
    for path, (_, leaf) in zip(paths, leaves):
        shape, dtype = _template_spec(leaf)
        if path not in stored:
            missing.append(f"missing: {path} (model expects shape {shape})")
            continue
        value = np.asarray(stored[path])
        if value.shape != shape:
            shapes.append(f"shape mismatch: {path}: checkpoint {value.shape}, model {shape}")
        elif _dtype_kind(value.dtype) != _dtype_kind(dtype):
            dtypes.append(f"dtype mismatch: {path}: checkpoint {value.dtype}, "
                          f"model {dtype}")
        matched.append(value)
    expected = set(paths)
    extra = [f"extra: {path} (checkpoint has shape {np.shape(stored[path])})"
             for path in sorted(stored) if path not in expected and not allow_extra(path)]
    problems = missing + extra + shapes + dtypes
    if problems:
        raise CheckpointError(_problem_report(problems), problems)
    return jax.tree_util.tree_unflatten(treedef, matched)


def load_checkpoint(path, template, *, allow_extra: Optional[Callable[[str], bool]] = None):
    """:func:`read_checkpoint` then :func:`match_checkpoint`; every message starts with ``path``.

    Parameters
    ----------
    path
        The checkpoint (any of :data:`CHECKPOINT_FORMATS`).
    template, allow_extra
        As in :func:`match_checkpoint`.

    Returns
    -------
    pytree
        The template's structure with the checkpoint's arrays (stored dtypes).

    Raises
    ------
    CheckpointError
        If the checkpoint cannot be read or does not match ``template``.
    """
    raw = read_checkpoint(path)
    try:
        return match_checkpoint(raw, template, allow_extra=allow_extra)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}", err.problems) from None


# --------------------------------------------------------------------------- writing, hashing


def save_npz(path, tree) -> None:
    """Write a pytree of arrays as an ``.npz`` of ``/``-joined paths, without pickle.

    The file is what :func:`read_checkpoint` reads: one ``.npy`` member per leaf, named by
    its :func:`flat_paths` path. It is written atomically and with a fixed zip timestamp, so
    the same tree always gives the same bytes (and :func:`checkpoint_sha256`).

    Parameters
    ----------
    path
        Where to write; must end in ``.npz`` (any other file would be read back as msgpack).
    tree
        A pytree of arrays (see :func:`flat_paths`).

    Raises
    ------
    CheckpointError
        If ``path`` does not end in ``.npz``, or a leaf's dtype does not survive ``.npy``
        (object arrays, bfloat16 and other ml_dtypes: cast them, or save with Orbax).
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise CheckpointError(f"{path}: an npz checkpoint's name must end in .npz")
    arrays = {key: np.asarray(leaf) for key, leaf in flat_paths(tree).items()}
    unsafe = [f"{key} ({a.dtype})" for key, a in arrays.items() if a.dtype.kind not in "biufc"]
    if unsafe:
        raise CheckpointError(f"{path}: leaves an .npz cannot hold without pickle or without "
                              f"losing their dtype: {', '.join(unsafe)}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=_NPZ_DATE_TIME)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)


def checkpoint_sha256(path) -> str:
    """SHA-256 hex digest of a checkpoint, so a changed checkpoint makes a different run.

    A file: the digest of its bytes (``sha256sum`` gives the same). A directory: every regular
    file below it (symlinks skipped) in sorted order of relative POSIX path, each entered as
    its path, its byte count and its bytes, so a renamed, added or edited file changes it.
    Orbax writes timestamps into ``_CHECKPOINT_METADATA``, so two saves of the same arrays hash
    differently; a copied directory hashes the same.

    Raises
    ------
    CheckpointError
        If nothing exists at ``path``.
    """
    path = Path(path)
    checkpoint_format(path)  # names a missing path
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
        return digest.hexdigest()
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            file = Path(root) / name
            if file.is_file() and not file.is_symlink():
                files.append((file.relative_to(path).as_posix(), file))
    for relative, file in sorted(files):
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        _hash_file(digest, file)
    return digest.hexdigest()
