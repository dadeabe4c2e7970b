"""crit.checkpoints: Orbax, msgpack and npz checkpoints read without pickle and matched by path."""

from __future__ import annotations

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

from crit.checkpoints import (
    CHECKPOINT_FORMATS,
    CheckpointError,
    checkpoint_format,
    checkpoint_sha256,
    flat_paths,
    load_checkpoint,
    match_checkpoint,
    read_checkpoint,
    save_npz,
)


class DenseBatchNorm(nn.Module):
    """Linen: Dense then BatchNorm, so the variables hold ``params`` and ``batch_stats``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


class LinearBatchNorm(nnx.Module):
    """NNX: Linear then BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def _orbax_save(directory, tree) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()


def _save(fmt: str, path, tree):
    """Save ``tree`` in ``fmt`` under ``path`` (a tmp dir) the way a researcher would."""
    if fmt == "orbax":
        target = path / "orbax_ckpt"
        _orbax_save(target, tree)
    elif fmt == "msgpack":
        target = path / "ckpt.msgpack"
        target.write_bytes(serialization.to_bytes(tree))
    else:
        target = path / "ckpt.npz"
        save_npz(target, tree)
    return target


def _assert_bitwise_equal(got, want) -> None:
    got_flat, want_flat = flat_paths(got), flat_paths(want)
    assert got_flat.keys() == want_flat.keys()
    for path, leaf in want_flat.items():
        leaf = np.asarray(leaf)
        assert got_flat[path].dtype == leaf.dtype, path
        assert got_flat[path].tobytes() == leaf.tobytes(), path


@pytest.fixture(scope="module")
def linen_variables():
    """Trained-looking linen variables: random params and non-trivial batch statistics."""
    module = DenseBatchNorm()
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
def test_linen_round_trip_is_bitwise(tmp_path, linen_variables, fmt):
    path = _save(fmt, tmp_path, linen_variables)
    assert checkpoint_format(path) == fmt
    abstract = jax.eval_shape(DenseBatchNorm().init, jax.random.key(0), jnp.ones((8, 3)))
    loaded = load_checkpoint(path, abstract)
    _assert_bitwise_equal(loaded, linen_variables)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(loaded))
    # The template's structure comes back, so the loaded variables apply as they are.
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(DenseBatchNorm().apply(loaded, x),
                                  DenseBatchNorm().apply(linen_variables, x))


def test_orbax_step_directory_of_a_checkpoint_manager(tmp_path, linen_variables):
    manager = ocp.CheckpointManager(tmp_path / "run")
    manager.save(5, args=ocp.args.StandardSave(linen_variables))
    manager.wait_until_finished()
    manager.close()
    _assert_bitwise_equal(load_checkpoint(tmp_path / "run" / "5", linen_variables),
                          linen_variables)
    with pytest.raises(CheckpointError, match="steps 5"):
        read_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("saved", ["state", "pure_dict", "msgpack"])
def test_nnx_round_trip_restores_the_model(tmp_path, saved):
    model = LinearBatchNorm(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (8, 3), jnp.float32)
    model.train()
    model(x)  # move the batch statistics away from their initial values
    model.eval()
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    if saved == "state":  # Flax's NNX checkpoint guide: the State itself
        path = tmp_path / "state"
        _orbax_save(path, state)
    elif saved == "pure_dict":  # the guide's pure-dict variant
        path = tmp_path / "pure_dict"
        _orbax_save(path, pure)
    else:
        path = tmp_path / "state.msgpack"
        path.write_bytes(serialization.to_bytes(pure))

    fresh = LinearBatchNorm(nnx.Rngs(7))
    fresh.eval()
    loaded = load_checkpoint(path, nnx.to_pure_dict(nnx.state(fresh)))
    _assert_bitwise_equal(loaded, pure)
    fresh_state = nnx.state(fresh)
    nnx.replace_by_pure_dict(fresh_state, loaded)
    nnx.update(fresh, fresh_state)
    np.testing.assert_array_equal(fresh(x), model(x))


def test_nnx_state_template_is_matched_as_its_pure_dict(tmp_path):
    model = LinearBatchNorm(nnx.Rngs(0))
    path = tmp_path / "state"
    _orbax_save(path, nnx.state(model))
    loaded = load_checkpoint(path, nnx.state(LinearBatchNorm(nnx.Rngs(3))))
    _assert_bitwise_equal(loaded, nnx.to_pure_dict(nnx.state(model)))


def _variables(kernel_shape=(3, 4)):
    return {"params": {"Dense_0": {"kernel": np.ones(kernel_shape, np.float32),
                                   "bias": np.zeros(4, np.float32)},
                       "Dense_1": {"bias": np.zeros(4, np.float32)}}}


def _broken(missing=False, extra=False, misshaped=False):
    tree = _variables(kernel_shape=(3, 5) if misshaped else (3, 4))
    if missing:
        del tree["params"]["Dense_1"]["bias"]
    if extra:
        tree["params"]["Dense_9"] = {"kernel": np.ones((3, 4), np.float32)}
    return tree


@pytest.mark.parametrize("problem, expected", [
    ("missing", ["missing: params/Dense_1/bias (model expects shape (4,))"]),
    ("extra", ["extra: params/Dense_9/kernel (checkpoint has shape (3, 4))"]),
    ("misshaped", ["shape mismatch: params/Dense_0/kernel: checkpoint (3, 5), model (3, 4)"]),
])
def test_one_mismatch_is_refused_naming_the_path(tmp_path, problem, expected):
    path = tmp_path / "ckpt.npz"
    save_npz(path, _broken(**{problem: True}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, _variables())
    message = str(info.value)
    assert message.startswith(str(path))
    assert list(info.value.problems) == expected
    assert expected[0] in message


def test_all_problems_are_listed_in_one_error(tmp_path):
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(serialization.to_bytes(_broken(missing=True, extra=True, misshaped=True)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, _variables())
    message = str(info.value)
    assert "3 problems" in message
    for line in ("missing: params/Dense_1/bias (model expects shape (4,))",
                 "extra: params/Dense_9/kernel (checkpoint has shape (3, 4))",
                 "shape mismatch: params/Dense_0/kernel: checkpoint (3, 5), model (3, 4)"):
        assert line in message


def test_allowed_extra_leaves_are_ignored():
    raw = _variables()
    raw["rngs"] = {"default": {"count": np.array(3, np.uint32)}}
    template = _variables()
    with pytest.raises(CheckpointError, match="extra: rngs/default/count"):
        match_checkpoint(raw, template)
    matched = match_checkpoint(raw, template, allow_extra=lambda p: p.startswith("rngs/"))
    _assert_bitwise_equal(matched, template)


def test_dtype_kind_mismatch_is_refused():
    raw = _variables()
    raw["params"]["Dense_1"]["bias"] = np.zeros(4, np.int32)
    with pytest.raises(CheckpointError,
                       match="dtype mismatch: params/Dense_1/bias: checkpoint int32, model float"):
        match_checkpoint(raw, _variables())


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
def test_float32_stays_float32_against_a_float64_template(tmp_path, fmt):
    tree = {"w": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
            "step": np.array(2 ** 40, np.int64)}
    template = {"w": jax.ShapeDtypeStruct((2, 3), np.float64),
                "step": jax.ShapeDtypeStruct((), np.int64)}
    loaded = load_checkpoint(_save(fmt, tmp_path, tree), template)
    assert loaded["w"].dtype == np.float32
    # An int64 leaf survives even with jax_enable_x64 off (Orbax restores to NumPy).
    assert loaded["step"].dtype == np.int64 and int(loaded["step"]) == 2 ** 40
    _assert_bitwise_equal(loaded, tree)


def test_orbax_keeps_64_bit_jax_leaves_with_x64_off(tmp_path):
    # Orbax 0.12's StandardCheckpointer().restore(path) would give these back as jax arrays,
    # float64 -> float32 and int64 -> int32 (2**40 -> 0) when x64 is off.
    tree = {"w": jnp.arange(3, dtype=jnp.float64) + 0.1, "step": jnp.array(2 ** 40, jnp.int64)}
    path = tmp_path / "orbax_ckpt"
    _orbax_save(path, tree)
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        raw = read_checkpoint(path)
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert raw["w"].dtype == np.float64 and raw["step"].dtype == np.int64
    assert int(raw["step"]) == 2 ** 40
    _assert_bitwise_equal(raw, tree)


def test_npz_object_array_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"params/w": np.array([{"code": "anything"}], dtype=object)})
    with pytest.raises(CheckpointError, match="params/w.*without pickle"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="without pickle"):
        save_npz(tmp_path / "out.npz", {"w": np.array([None], dtype=object)})


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.msgpack"):
        checkpoint_format(tmp_path / "nowhere.msgpack")
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", _variables())


def test_unreadable_file_is_one_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="garbage.npz.*npz"):
        read_checkpoint(path)


def test_flat_paths_of_nested_containers():
    tree = {"a": [np.zeros(1), (np.ones(2),)], "b": {"c": np.zeros(3)}}
    assert list(flat_paths(tree)) == ["a/0", "a/1/0", "b/c"]


def test_npz_round_trip_of_lists_matches_by_index(tmp_path):
    tree = {"layers": [{"w": np.arange(3.0)}, {"w": np.arange(4.0)}]}
    path = tmp_path / "layers.npz"
    save_npz(path, tree)
    assert read_checkpoint(path)["layers"]["1"]["w"].shape == (4,)
    _assert_bitwise_equal(load_checkpoint(path, tree), tree)


def _flip_one_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def test_sha256_of_a_file_changes_with_one_byte_of_a_leaf(tmp_path):
    tree = {"w": np.arange(8, dtype=np.float32)}
    first, again = tmp_path / "a.npz", tmp_path / "b.npz"
    save_npz(first, tree)
    save_npz(again, tree)
    assert checkpoint_sha256(first) == checkpoint_sha256(again)  # same tree, same bytes
    changed = tmp_path / "c.npz"
    tree["w"].view(np.uint8)[5] ^= 0x01
    save_npz(changed, tree)
    assert checkpoint_sha256(changed) != checkpoint_sha256(first)

    msgpack = tmp_path / "w.msgpack"
    msgpack.write_bytes(serialization.to_bytes(tree))
    before = checkpoint_sha256(msgpack)
    _flip_one_byte(msgpack)
    assert checkpoint_sha256(msgpack) != before


def test_sha256_of_an_orbax_directory_covers_the_array_data(tmp_path):
    path = tmp_path / "orbax_ckpt"
    _orbax_save(path, {"w": np.arange(64, dtype=np.float32)})
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    digest = checkpoint_sha256(path)
    assert checkpoint_sha256(copy) == digest  # relative paths: a moved checkpoint is the same
    data_files = [f for f in (path / "d").rglob("*") if f.is_file()]
    assert data_files, "Orbax layout changed: no array data under d/"
    _flip_one_byte(max(data_files, key=lambda f: f.stat().st_size))
    assert checkpoint_sha256(path) != digest
