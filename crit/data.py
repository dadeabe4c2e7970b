"""Data sets: generated, bundled with a package, or read from an ``.npz`` file. Nothing is
downloaded at run time.

Registry (:data:`DATASETS`, name -> function(n_points, seed, **kwargs) -> :class:`Dataset`):

* ``sinc``  -- y = sin(5πx)/(5πx) on x ∈ [1e-4, 1] (MLDS 2018 homework 1-1 / 1-2),
* ``sign``  -- y = sgn(sin(5πx)) on the same grid,
* ``gaussian`` -- x ~ N(0, I_d), y ~ N(0, I_k) independent (Pennington & Bahri 2017),
* ``digits`` -- scikit-learn's 8×8 handwritten digits (1797 images, 10 classes), pixels / 16,
  flattened to 64 features; ``digits_images`` -- the same as (n, 8, 8, 1) NHWC images, for
  convolutional nets and vision transformers,
* ``mnist1d`` -- MNIST-1D (Greydanus & Kobak 2024): 10 classes of 1-D signals of length 40,
  generated procedurally by the ``mnist1d`` package (offline), as (n, 40, 1) sequences,
* ``iris``, ``wine``, ``breast_cancer`` -- scikit-learn's bundled tabular classification sets,
  features standardized with the training split's mean and standard deviation,
* ``diabetes`` -- scikit-learn's bundled regression set (10 features), targets standardized.

A fork adds a data set by adding a function to :data:`DATASETS`. Data of your own go through
:func:`load_data_file` (``--data_file``): see its docstring for the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A data set: train and test arrays plus what kind of task it is.

    ``x`` has one row per example: (n, d) features, (n, L, C) sequences, (n, H, W, C) images
    (NHWC) or (n, L) integer tokens. ``y`` holds float targets of shape (n, k) for
    regression, or integer labels of shape (n,) for classification. A data set without a test
    split has test arrays with zero rows.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str  # "regression" | "classification"
    n_outputs: int  # output width the model needs

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])



# --------------------------------------------------------------------------- data sets

X_MIN, X_MAX = 1e-4, 1.0


def _grid_and_test(n_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train inputs on an even grid of [1e-4, 1]; test inputs drawn uniformly at random."""
    x_train = np.linspace(X_MIN, X_MAX, n_points)[:, None]
    rng = np.random.default_rng(seed + 7919)
    x_test = np.sort(rng.uniform(X_MIN, X_MAX, size=(max(n_points // 4, 1), 1)), axis=0)
    return x_train, x_test


def sinc_dataset(n_points: int = 256, seed: int = 0) -> Dataset:
    """y = sin(5πx) / (5πx) = ``np.sinc(5x)`` on an even grid of ``n_points`` in [1e-4, 1]."""
    x_train, x_test = _grid_and_test(n_points, seed)
    return Dataset("sinc", x_train, np.sinc(5 * x_train), x_test, np.sinc(5 * x_test),
                   "regression", 1)


def sign_dataset(n_points: int = 256, seed: int = 0) -> Dataset:
    """y = sgn(sin(5πx)) on an even grid of ``n_points`` in [1e-4, 1]."""
    x_train, x_test = _grid_and_test(n_points, seed)
    f = lambda x: np.sign(np.sin(5 * np.pi * x))
    return Dataset("sign", x_train, f(x_train), x_test, f(x_test), "regression", 1)


def gaussian_dataset(n_points: int = 256, seed: int = 0, dim_in: int = 8,
                     dim_out: int = 1) -> Dataset:
    """Independent standard Gaussian inputs and targets (Pennington & Bahri 2017, §5).

    Targets carry no signal: the loss surface is that of fitting noise, which is the setting
    of their random-matrix prediction for the index.
    """
    rng = np.random.default_rng(seed)
    n_test = max(n_points // 4, 1)
    x = rng.standard_normal((n_points + n_test, dim_in))
    y = rng.standard_normal((n_points + n_test, dim_out))
    return Dataset("gaussian", x[:n_points], y[:n_points], x[n_points:], y[n_points:],
                   "regression", dim_out)


def digits_dataset(n_points: int = 1437, seed: int = 0, downsample: int = 1) -> Dataset:
    """scikit-learn's 8×8 digits, pixels scaled to [0, 1], shuffled with ``seed``.

    ``n_points`` training images (at most 1797 − 1); the rest are the test set.
    ``downsample=2`` averages 2×2 pixel blocks (4×4 images, 16 inputs).
    """
    from sklearn.datasets import load_digits  # shipped with scikit-learn; no download

    bunch = load_digits()
    images = bunch.images.astype(np.float64) / 16.0
    if downsample > 1:
        s = downsample
        images = images.reshape(-1, 8 // s, s, 8 // s, s).mean(axis=(2, 4))
    x = images.reshape(len(images), -1)
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n = min(n_points, len(x) - 1)
    return Dataset("digits", x[:n], y[:n], x[n:], y[n:], "classification", 10)




def digits_images_dataset(n_points: int = 1437, seed: int = 0) -> Dataset:
    """:func:`digits_dataset` as (n, 8, 8, 1) NHWC images (same split, same order)."""
    flat = digits_dataset(n_points, seed)
    return flat._replace(name="digits_images", x_train=flat.x_train.reshape(-1, 8, 8, 1),
                         x_test=flat.x_test.reshape(-1, 8, 8, 1))


def mnist1d_dataset(n_points: int = 4000, seed: int = 0, n_test: int | None = None) -> Dataset:
    """MNIST-1D (Greydanus & Kobak, ICML 2024): 10 digit templates of length 12, padded,
    scaled, sheared, translated and noised into signals of length 40, by the ``mnist1d``
    package's own generator (no download). Returned as (n, 40, 1) sequences with integer
    labels; ``n_test`` defaults to n_points / 4.

    The generator seeds NumPy's global random state (its ``set_seed``); we restore it after.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    n_test = max(n_points // 4, 10) if n_test is None else n_test
    args = get_dataset_args()
    total = n_points + n_test
    args.num_samples = -(-total // 10) * 10        # whole samples per class
    args.train_split = n_points / args.num_samples
    args.seed = int(seed)
    saved = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(saved)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)[:, :, None]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return Dataset("mnist1d", x[:n_points], y[:n_points], x[n_points:total],
                   y[n_points:total], "classification", 10)


def _sklearn_tabular(name: str, loader: str, task: str, n_points: int | None, seed: int,
                     test_fraction: float = 0.25) -> Dataset:
    """A scikit-learn bundled set, shuffled with ``seed``, split, standardized on the train rows."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader)()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = len(x) - max(int(round(test_fraction * len(x))), 1)
    n = n_train if n_points is None else min(n_points, n_train)
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-12
    x = (x - mean) / std
    if task == "classification":
        y = y.astype(np.int32)
        k = int(y.max()) + 1
        return Dataset(name, x[:n], y[:n], x[n_train:], y[n_train:], task, k)
    y = y.astype(np.float64)[:, None]
    y = (y - y[:n].mean()) / y[:n].std()
    return Dataset(name, x[:n], y[:n], x[n_train:], y[n_train:], task, 1)


def iris_dataset(n_points: int | None = None, seed: int = 0) -> Dataset:
    """Fisher's iris (150 flowers, 4 features, 3 classes), scikit-learn's bundled copy."""
    return _sklearn_tabular("iris", "load_iris", "classification", n_points, seed)


def wine_dataset(n_points: int | None = None, seed: int = 0) -> Dataset:
    """UCI wine (178 wines, 13 features, 3 classes), scikit-learn's bundled copy."""
    return _sklearn_tabular("wine", "load_wine", "classification", n_points, seed)


def breast_cancer_dataset(n_points: int | None = None, seed: int = 0) -> Dataset:
    """Wisconsin breast cancer (569 cases, 30 features, 2 classes), scikit-learn's copy."""
    return _sklearn_tabular("breast_cancer", "load_breast_cancer", "classification", n_points,
                            seed)


def diabetes_dataset(n_points: int | None = None, seed: int = 0) -> Dataset:
    """Diabetes progression (442 patients, 10 features, one real target), scikit-learn's copy."""
    return _sklearn_tabular("diabetes", "load_diabetes", "regression", n_points, seed)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "sinc": sinc_dataset,
    "sign": sign_dataset,
    "gaussian": gaussian_dataset,
    "digits": digits_dataset,
    "digits_images": digits_images_dataset,
    "mnist1d": mnist1d_dataset,
    "iris": iris_dataset,
    "wine": wine_dataset,
    "breast_cancer": breast_cancer_dataset,
    "diabetes": diabetes_dataset,
}


# The task of each registry data set, known without building it (flag checks use this).
TASKS = {"sinc": "regression", "sign": "regression", "gaussian": "regression",
         "digits": "classification", "digits_images": "classification",
         "mnist1d": "classification", "iris": "classification", "wine": "classification",
         "breast_cancer": "classification", "diabetes": "regression"}


def check_dataset(data: Dataset) -> None:
    """Raise ``ValueError`` naming the array if a data set holds NaN/inf or mismatched shapes."""
    for field in ("x_train", "y_train", "x_test", "y_test"):
        arr = np.asarray(getattr(data, field))
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"data set {data.name!r}: {field} contains NaN or inf values")
    if data.x_train.shape[0] != data.y_train.shape[0]:
        raise ValueError(f"data set {data.name!r}: x_train has {data.x_train.shape[0]} rows but "
                         f"y_train has {data.y_train.shape[0]}")
    if data.x_train.shape[0] == 0:
        raise ValueError(f"data set {data.name!r} has no training points")


# --------------------------------------------------------------------------- data files

DATA_FILE_KEYS = ("x_train", "y_train", "x_test", "y_test", "n_classes")


class DataFileError(ValueError):
    """A ``--data_file`` that cannot be used; the message names the file and the key."""


def _read_npz(path) -> tuple[Path, str, dict]:
    """(path, the flag text naming it, its arrays), read without pickle; DataFileError for a
    missing file, a file that is not an npz, or object arrays."""
    path = Path(path)
    where = f"--data_file={path}"
    if not path.is_file():
        raise DataFileError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return path, where, {k: z[k] for k in z.files}
    except Exception as exc:  # not an npz, truncated, or object arrays (pickle)
        raise DataFileError(f"{where}: cannot be read as .npz without pickle ({exc})") from None


def load_data_file(path: str | Path, n_points: int | None = None) -> Dataset:
    """Read a data set from an ``.npz`` file, checking everything before any compute.

    Keys
    ----
    x_train : (n, ...) float features: (n, d) vectors, (n, L, C) sequences, (n, H, W, C)
        images in NHWC order, or (n, L) integer token ids.
    y_train : (n,) integer class labels 0..K−1 (classification), or (n,) / (n, k) float
        targets (regression). The dtype decides the task.
    x_test, y_test : optional, the same layout; without them the test split is empty.
    n_classes : optional integer K; default max label + 1 over train and test.

    Read with ``allow_pickle=False`` (object arrays are refused: loading never runs code).
    Raises :class:`DataFileError` naming the file and the key for: a missing or unreadable
    file, a missing key, an unknown key, mismatched rows, NaN/inf, labels out of range,
    test features whose shape differs from the training features'.
    """
    path, where, arrays = _read_npz(path)
    unknown = sorted(set(arrays) - set(DATA_FILE_KEYS))
    if unknown:
        raise DataFileError(f"{where}: unknown key(s) {unknown}; allowed: {list(DATA_FILE_KEYS)}")
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataFileError(f"{where}: missing key '{key}' (keys: {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        missing = "y_test" if "x_test" in arrays else "x_test"
        raise DataFileError(f"{where}: missing key '{missing}' (x_test and y_test go together)")
    x, y = arrays["x_train"], arrays["y_train"]
    x_test = arrays.get("x_test", np.zeros((0, *x.shape[1:]), x.dtype))
    y_test = arrays.get("y_test", np.zeros((0, *y.shape[1:]), y.dtype))
    for key, arr in (("x_train", x), ("y_train", y), ("x_test", x_test), ("y_test", y_test)):
        if arr.dtype.kind not in "fiub":
            raise DataFileError(f"{where}: key '{key}' has dtype {arr.dtype}; expected numbers")
        if arr.ndim == 0:
            raise DataFileError(f"{where}: key '{key}' is a scalar; expected one row per example")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise DataFileError(f"{where}: key '{key}' contains NaN or inf")
    for xs, ys, kx, ky in ((x, y, "x_train", "y_train"), (x_test, y_test, "x_test", "y_test")):
        if xs.shape[0] != ys.shape[0]:
            raise DataFileError(f"{where}: key '{kx}' has {xs.shape[0]} rows but '{ky}' has "
                                f"{ys.shape[0]}")
    if x.shape[0] == 0:
        raise DataFileError(f"{where}: key 'x_train' has no rows")
    if x_test.shape[1:] != x.shape[1:]:
        raise DataFileError(f"{where}: key 'x_test' has examples of shape {x_test.shape[1:]}, "
                            f"'x_train' of shape {x.shape[1:]}")
    if y.dtype.kind in "iub":
        if y.ndim != 1 or y_test.ndim != 1:
            raise DataFileError(f"{where}: key 'y_train' holds integer labels, which must be a "
                                f"vector (n,), got shape {y.shape}")
        if y_test.size and y_test.dtype.kind not in "iub":
            raise DataFileError(f"{where}: key 'y_test' must hold integer labels like y_train")
        labels = np.concatenate([y, y_test]).astype(np.int64)
        k = int(arrays["n_classes"]) if "n_classes" in arrays else int(labels.max()) + 1
        for key, arr in (("y_train", y), ("y_test", y_test)):
            bad = arr[(arr < 0) | (arr >= k)]
            if bad.size:
                raise DataFileError(f"{where}: key '{key}' has labels out of range 0..{k - 1} "
                                    f"(e.g. {int(bad[0])})")
        if k < 2:
            raise DataFileError(f"{where}: key 'y_train' has one class; need at least 2")
        task, y, y_test, n_out = "classification", y.astype(np.int32), y_test.astype(np.int32), k
    else:
        if "n_classes" in arrays:
            raise DataFileError(f"{where}: key 'n_classes' given but 'y_train' holds float "
                                "targets (regression); store labels as integers")
        y = y.reshape(len(y), -1).astype(np.float64)
        y_test = (y_test.reshape(len(y_test), -1) if y_test.size
                  else np.zeros((0, y.shape[1]))).astype(np.float64)
        if y_test.size and y_test.shape[1] != y.shape[1]:
            raise DataFileError(f"{where}: key 'y_test' has {y_test.shape[1]} targets per row, "
                                f"'y_train' {y.shape[1]}")
        task, n_out = "regression", y.shape[1]
    if x.dtype.kind == "f":
        x, x_test = x.astype(np.float64), x_test.astype(np.float64)
    if n_points is not None:
        x, y = x[:n_points], y[:n_points]
    return Dataset(path.stem, x, y, x_test, y_test, task, int(n_out))


def load_xy_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x_train, y_train)`` of an ``.npz`` as they are, for a loss of the user's own whose
    targets need not be labels or regression targets (e.g. next-token ids of shape (n, L)).

    Read with ``allow_pickle=False``; the other keys of :func:`load_data_file` are allowed and
    ignored. Raises :class:`DataFileError` for a missing file or key, mismatched rows, no rows,
    non-numeric arrays, or NaN/inf.
    """
    path, where, arrays = _read_npz(path)
    arrays = {k: v for k, v in arrays.items() if k in ("x_train", "y_train")}
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataFileError(f"{where}: missing key '{key}'")
        arr = arrays[key]
        if arr.dtype.kind not in "fiub" or arr.ndim == 0:
            raise DataFileError(f"{where}: key '{key}' must be a numeric array with one row per "
                                f"example, got {arr.dtype} of shape {arr.shape}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise DataFileError(f"{where}: key '{key}' contains NaN or inf")
    x, y = arrays["x_train"], arrays["y_train"]
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataFileError(f"{where}: 'x_train' has {x.shape[0]} rows and 'y_train' "
                            f"{y.shape[0]}; need the same, at least one")
    return x, y
