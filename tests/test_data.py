"""Data sets: the registry's shapes and tasks, MNIST-1D offline, and --data_file round trips
with one clear error per bad file."""

import numpy as np
import pytest

from crit.data import DATASETS, DataFileError, load_data_file, mnist1d_dataset


def test_registry_shapes_and_tasks():
    expect = {"digits_images": ((8, 8, 1), "classification", 10),
              "mnist1d": ((40, 1), "classification", 10),
              "iris": ((4,), "classification", 3), "wine": ((13,), "classification", 3),
              "breast_cancer": ((30,), "classification", 2),
              "diabetes": ((10,), "regression", 1)}
    for name, (shape, task, k) in expect.items():
        d = DATASETS[name](seed=0)
        assert d.x_train.shape[1:] == shape and d.task == task and d.n_outputs == k, name
        assert d.x_test.shape[0] > 0 and d.x_test.shape[1:] == shape
        if task == "classification":
            assert set(np.unique(d.y_train)) == set(range(k)), name
    flat, images = DATASETS["digits"](seed=3), DATASETS["digits_images"](seed=3)
    np.testing.assert_array_equal(flat.x_train, images.x_train.reshape(len(flat.x_train), -1))


def test_tabular_sets_are_standardized_on_the_training_split():
    d = DATASETS["wine"](seed=1)
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(d.x_train.std(0), 1, atol=1e-9)


def test_mnist1d_is_generated_offline_deterministically_without_touching_numpy_state():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = mnist1d_dataset(n_points=200, seed=5, n_test=50)
    assert np.random.random() == before            # global RNG restored
    b = mnist1d_dataset(n_points=200, seed=5, n_test=50)
    c = mnist1d_dataset(n_points=200, seed=6, n_test=50)
    assert a.x_train.shape == (200, 40, 1) and a.x_test.shape == (50, 40, 1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert set(np.unique(a.y_train)) == set(range(10))


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_round_trip_classification_and_regression(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, 12)
    d = load_data_file(write(tmp_path / "img.npz", x_train=x, y_train=y, x_test=x[:3],
                             y_test=y[:3], n_classes=7))
    assert d.task == "classification" and d.n_outputs == 7 and d.x_train.dtype == np.float64
    np.testing.assert_array_equal(d.x_train, x.astype(np.float64))
    np.testing.assert_array_equal(d.y_test, y[:3])
    r = load_data_file(write(tmp_path / "reg.npz", x_train=x[:, 0, 0], y_train=y * 0.5))
    assert r.task == "regression" and r.y_train.shape == (12, 1) and r.x_test.shape == (0, 3)
    assert load_data_file(tmp_path / "reg.npz", n_points=5).n_train == 5


@pytest.mark.parametrize("arrays, needle", [
    (dict(y_train=np.zeros(3, int)), "missing key 'x_train'"),
    (dict(x_train=np.zeros((3, 2))), "missing key 'y_train'"),
    (dict(x_train=np.zeros((3, 2)), y_train=np.zeros(4, int)),
     "key 'x_train' has 3 rows but 'y_train' has 4"),
    (dict(x_train=np.array([[0.0], [np.nan]]), y_train=np.zeros(2)), "'x_train' contains NaN"),
    (dict(x_train=np.zeros((2, 1)), y_train=np.array([0.0, np.inf])), "'y_train' contains NaN or inf"),
    (dict(x_train=np.zeros((3, 1)), y_train=np.array([0, 1, 5]), n_classes=3),
     "labels out of range 0..2 (e.g. 5)"),
    (dict(x_train=np.zeros((3, 1)), y_train=np.array([0, -1, 1])), "labels out of range"),
    (dict(x_train=np.zeros((3, 1)), y_train=np.zeros(3, int), x_test=np.zeros((2, 1))),
     "missing key 'y_test'"),
    (dict(x_train=np.zeros((3, 2)), y_train=np.array([0, 1, 1]), x_test=np.zeros((2, 3)),
          y_test=np.array([0, 1])), "'x_test' has examples of shape (3,)"),
    (dict(x_train=np.zeros((3, 1)), y_train=np.zeros(3), labels=np.zeros(3)),
     "unknown key(s) ['labels']"),
    (dict(x_train=np.zeros((3, 1)), y_train=np.array(["a", "b", "c"])), "dtype <U1"),
    (dict(x_train=np.zeros((0, 1)), y_train=np.zeros(0)), "'x_train' has no rows"),
])
def test_each_bad_file_gets_one_clear_error_naming_file_and_key(tmp_path, arrays, needle):
    path = write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFileError) as info:
        load_data_file(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        load_data_file(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFileError, match="cannot be read"):
        load_data_file(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0])
    with pytest.raises(DataFileError, match="without pickle"):
        load_data_file(tmp_path / "obj.npz")
