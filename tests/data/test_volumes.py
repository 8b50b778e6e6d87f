import time
from pathlib import Path

import numpy as np
import pytest

import fedfm.data.medmnist as mm
from fedfm.config import DataConfig
from fedfm.data import DataError, Split, dataset_info, label_counts, load_sites
from fedfm.data.folder import load_folder_sites
from fedfm.data.png import write_png
from fedfm.data.resize import prepare_images, raw_spatial_dims, resize_images
from fedfm.data.shift import apply_shift, bias_field, site_shift_params
from fedfm.data.synthetic import balanced_labels, load_synthetic_sites
from fedfm.data.synthetic3d import render_volumes

COUNTS = {"train": 60, "val": 15, "test": 24}
BASE = {"train": 0, "val": 70, "test": 100}  # volume value ranges per split, so provenance is visible


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    return float((ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def write_volume_npz(path: Path, classes: int = 2, side: int = 28) -> Path:
    """A MedMNIST-3D-shaped file: volume i of a split is uint8 (side,)*3 all BASE+i, labelled (BASE+i) % classes."""
    arrays = {}
    for split, n in COUNTS.items():
        values = (BASE[split] + np.arange(n)).astype(np.uint8)
        arrays[f"{split}_images"] = np.ascontiguousarray(np.broadcast_to(values[:, None, None, None], (n,) + (side,) * 3))
        arrays[f"{split}_labels"] = (values % classes).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


def write_image_npz(path: Path) -> Path:
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


def volume_values(images: np.ndarray) -> np.ndarray:
    flat = np.round(images[:, 0] * 255).reshape(len(images), -1)
    assert np.all(flat == flat[:, :1]), "constant volumes stay constant through the resize"
    return flat[:, 0].astype(int)


def medmnist_cfg(path: Path, **kw) -> DataConfig:
    base = dict(source="medmnist", path=str(path), num_sites=3, image_size=16, site_shift=0.0)
    return DataConfig(**{**base, **kw})


# --- types ---------------------------------------------------------------------------------------


def test_a_split_knows_its_spatial_dims():
    vol = Split(np.zeros((4, 1, 6, 6, 6), np.float32), np.zeros(4, np.int64))
    img = Split(np.zeros((4, 3, 6, 6), np.float32), np.zeros(4, np.int64))
    assert (vol.spatial_dims, img.spatial_dims) == (3, 2)
    with pytest.raises(ValueError):
        Split(np.zeros((4, 1, 2, 6, 6, 6), np.float32), np.zeros(4, np.int64))


# --- resizing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dims",
    [
        ((5, 28, 28), 2),  # gray images
        ((5, 28, 28, 3), 2),  # RGB images
        ((5, 28, 28, 1), 2),  # gray images with a channel axis
        ((5, 28, 28, 28), 3),  # MedMNIST 3D
        ((5, 64, 64, 64), 3),  # MedMNIST 3D _64
        ((5, 16, 16, 16, 1), 3),  # volumes with a channel axis
        ((5, 3, 3, 3), None),  # too small to tell
        ((5, 28, 28, 20), None),  # non-cubic: data.spatial_dims must say
        ((5, 28), None),
    ],
)
def test_raw_spatial_dims_rule(shape, dims):
    assert raw_spatial_dims(shape) == dims


def test_volumes_resize_trilinear_with_area_shrinking():
    up = prepare_images(np.full((2, 8, 8, 8), 51, np.uint8), 16, spatial_dims=3)
    assert up.shape == (2, 1, 16, 16, 16) and up.dtype == np.float32 and np.allclose(up, 0.2)
    ramp = np.broadcast_to(np.linspace(0, 1, 8, dtype=np.float32), (1, 1, 8, 8, 8))
    enlarged = resize_images(ramp, 16)[0, 0, 0, 0]
    assert np.all(np.diff(enlarged) >= 0) and 0.0 <= enlarged.min() < 0.05 and 0.95 < enlarged.max() <= 1.0
    sheets = np.zeros((1, 1, 32, 32, 32), np.float32)
    sheets[:, :, ::2] = 1.0
    down = resize_images(sheets, 16)  # plain trilinear would keep alternating 0/1 sheets here
    assert np.allclose(down, 0.5, atol=1e-6), "area averaging does not alias fine detail"
    mixed = resize_images(np.full((3, 1, 20, 40, 12), 0.3, np.float32), 16)
    assert mixed.shape == (3, 1, 16, 16, 16) and np.allclose(mixed, 0.3, atol=1e-6)


# --- site shift ----------------------------------------------------------------------------------


def test_shift_means_the_same_per_voxel():
    vols = np.random.default_rng(0).uniform(0.2, 0.8, (6, 1, 8, 8, 8)).astype(np.float32)
    pointwise = {"gamma": 1.3, "gain": 0.9, "offset": 0.04}
    as_slices = apply_shift(vols.reshape(48, 1, 8, 8), pointwise, seed=0).reshape(vols.shape)
    assert np.allclose(apply_shift(vols, pointwise, seed=0), as_slices, atol=1e-6)
    p = site_shift_params(1, 1.0, seed=0)
    y = apply_shift(vols, p, seed=5)
    assert y.shape == vols.shape and y.dtype == np.float32 and 0.0 <= y.min() and y.max() <= 1.0
    assert np.array_equal(y, apply_shift(vols, p, seed=5)) and np.abs(y - vols).mean() > 0.01


def test_3d_bias_field_varies_like_a_2d_one():
    field = bias_field(12, 12, 0.12, seed=3, depth=10)
    assert field.shape == (10, 12, 12) and field.min() > 0

    def mean_sq_log(depth):
        return np.mean([np.mean(np.log(bias_field(24, 24, 0.12, s, depth)) ** 2) for s in range(200)])

    assert mean_sq_log(24) == pytest.approx(mean_sq_log(None), rel=0.15)


# --- synthetic volumes ---------------------------------------------------------------------------


def test_synthetic_volumes_through_the_site_pipeline():
    cfg = DataConfig(num_sites=3, samples_per_site=60, image_size=16, spatial_dims=3, site_shift=1.0)
    sites = load_synthetic_sites(cfg)
    for s in sites:
        assert (len(s.train), len(s.val), len(s.test)) == (42, 6, 12)
        assert s.train.images.shape == (42, 1, 16, 16, 16) and s.test.images.shape == (12, 1, 16, 16, 16)
        assert s.spatial_dims == 3 and s.channels == 1 and s.train.images.dtype == np.float32
        assert 0.0 <= s.train.images.min() and s.train.images.max() <= 1.0
        assert abs(label_counts(s.test, 2)[0] - 6) <= 1
    assert np.ptp([s.train.images.mean() for s in sites]) > 0.03, "site shift applies to volumes"
    info = dataset_info(cfg)
    assert (info.spatial_dims, info.channels, info.image_size) == (3, 1, 16)
    dirichlet = load_synthetic_sites(cfg.model_copy(update={"partition": "dirichlet", "alpha": 0.1}))
    assert sum(len(s.train) + len(s.val) + len(s.test) for s in dirichlet) == 180


def test_synthetic_volumes_are_deterministic_and_seeded():
    cfg = DataConfig(num_sites=2, samples_per_site=20, image_size=16, spatial_dims=3, seed=3)
    a, b = load_synthetic_sites(cfg), load_synthetic_sites(cfg)
    assert all(np.array_equal(x.train.images, y.train.images) for x, y in zip(a, b))
    c = load_synthetic_sites(cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(a[0].train.images, c[0].train.images)
    big = render_volumes(np.arange(6) % 2, 40, np.random.default_rng(0))
    assert big.shape == (6, 1, 40, 40, 40) and 0.0 <= big.min() and big.max() <= 1.0


def test_volume_label_is_the_number_of_lesions():
    """Flipping labels with the same random stream only adds or removes lesion balls."""
    for k in (2, 4):
        base = np.arange(32) % k
        flipped = (k - 1) - base  # same max, so the same random draws
        x0 = render_volumes(base, 16, np.random.default_rng(0))
        x1 = render_volumes(flipped, 16, np.random.default_rng(0))
        delta = (x1 - x0).reshape(32, -1).sum(axis=1)
        more = flipped > base
        assert np.all(delta[more] > 0.5)
        assert np.all(delta[~more & (flipped != base)] < -0.5)
        assert np.all(delta[flipped == base] == 0)
        changed = (np.abs(x1 - x0) > 0.02).reshape(32, -1).mean(axis=1)
        assert changed[flipped != base].max() < 0.2, "a lesion is local, not a global brightness change"


def test_volume_task_is_learnable_but_not_trivial():
    labels = np.arange(400) % 4
    x = render_volumes(labels, 16, np.random.default_rng(2)).reshape(400, -1)
    means = [float(x[labels == c].mean()) for c in range(4)]
    assert means == sorted(means) and means[3] - means[0] > 0.003, "more lesions, brighter on average"
    rng = np.random.default_rng(1)
    y = balanced_labels(1200, 2, rng)
    x = render_volumes(y, 16, rng).reshape(1200, -1).astype(np.float64)
    xtr, ytr, xte, yte = x[:800], y[:800], x[800:], y[800:]
    mu = xtr.mean(axis=0)
    centred = xtr - mu
    w = centred.T @ np.linalg.solve(centred @ centred.T + 10.0 * np.eye(800), ytr - ytr.mean())  # ridge, dual form
    assert 0.6 < auroc((xte - mu) @ w, yte) < 0.9


def test_volume_generation_is_cheap():
    labels = balanced_labels(300, 2, np.random.default_rng(0))
    render_volumes(labels[:4], 28, np.random.default_rng(0))  # warm up
    start = time.perf_counter()
    out = render_volumes(labels, 28, np.random.default_rng(0))
    assert out.shape == (300, 1, 28, 28, 28)
    assert time.perf_counter() - start < 1.5


# --- MedMNIST 3D ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partition,classes", [("iid", 2), ("dirichlet", 3)])
def test_medmnist_3d_file_through_load_sites(tmp_path, partition, classes):
    npz = write_volume_npz(tmp_path / f"vol_{partition}.npz", classes=classes)
    cfg = medmnist_cfg(npz, partition=partition, alpha=1.0, num_classes=classes)
    sites = load_sites(cfg)
    assert len(sites) == 3 and all(s.spatial_dims == 3 and s.channels == 1 for s in sites)
    for split, n in COUNTS.items():
        seen = []
        for s in sites:
            part = getattr(s, split)
            assert part.images.shape[1:] == (1, 16, 16, 16)
            values = volume_values(part.images)
            assert np.all((values >= BASE[split]) & (values < BASE[split] + n)), f"{split} from {split}_images only"
            assert np.array_equal(part.labels, values % classes), "volume/label pairs kept together"
            seen.extend(values.tolist())
        assert sorted(seen) == list(range(BASE[split], BASE[split] + n)), "sites share out the whole split"
    info = dataset_info(cfg)
    assert (info.spatial_dims, info.num_classes, info.image_size) == (3, classes, 16)
    assert load_sites(cfg.model_copy(update={"spatial_dims": 3}))[0].spatial_dims == 3


def test_medmnist_3d_with_site_shift_and_64_cube(tmp_path):
    npz = write_volume_npz(tmp_path / "vol64.npz", side=64)
    sites = load_sites(medmnist_cfg(npz, image_size=24, site_shift=1.0))
    assert all(s.shift and s.train.images.shape[1:] == (1, 24, 24, 24) for s in sites)
    assert all(0.0 <= s.train.images.min() and s.train.images.max() <= 1.0 for s in sites)


def test_medmnist_spatial_dims_disagreement_is_one_line(tmp_path):
    volumes = write_volume_npz(tmp_path / "vol.npz")
    with pytest.raises(DataError, match=r"data.spatial_dims=2 .*vol.npz.* 3D volumes .*set data.spatial_dims=3") as info:
        load_sites(medmnist_cfg(volumes, spatial_dims=2))
    assert "\n" not in str(info.value)
    images = write_image_npz(tmp_path / "img.npz")
    with pytest.raises(DataError, match=r"data.spatial_dims=3 .*img.npz.* 2D images .*set data.spatial_dims=2"):
        load_sites(medmnist_cfg(images, spatial_dims=3))
    assert load_sites(medmnist_cfg(images, spatial_dims=2))[0].spatial_dims == 2


def test_medmnist_non_cubic_volumes_need_spatial_dims(tmp_path):
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = np.full((n, 20, 28, 24), 100, np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None]
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(DataError, match=r"train_images has shape \(60, 20, 28, 24\).*set data.spatial_dims=3"):
        load_sites(medmnist_cfg(tmp_path / "odd.npz"))
    sites = load_sites(medmnist_cfg(tmp_path / "odd.npz", spatial_dims=3))
    assert sites[0].train.images.shape[1:] == (1, 16, 16, 16)
    assert np.allclose(sites[0].train.images, 100 / 255, atol=1e-6)


def test_medmnist_3d_names_are_downloadable(tmp_path, monkeypatch):
    source = write_volume_npz(tmp_path / "remote.npz")
    md5 = mm.md5sum(source)
    info = {
        "tinymnist": {"url": "file:///nowhere", "MD5": "x", "url_224": "file:///nowhere", "MD5_224": "x"},
        "tinymnist3d": {"url": "file:///nowhere", "MD5": "x", "url_64": source.as_uri(), "MD5_64": md5},
    }
    monkeypatch.setattr(mm, "medmnist_info", lambda: info)
    assert mm.download_npz("tinymnist3d_64", str(tmp_path / "dl")).name == "tinymnist3d_64.npz"
    with pytest.raises(DataError, match=r"2D: tinymnist \(or add _224\); 3D: tinymnist3d \(or add _64\)"):
        mm.download_npz("tinymnist3d_128", str(tmp_path / "dl"))


# --- folder and 2D -------------------------------------------------------------------------------


def test_folder_rejects_3d(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    write_png(tmp_path / "a" / "x" / "0.png", np.zeros((8, 8), np.uint8))
    cfg = DataConfig(source="folder", path=str(tmp_path), num_sites=1, spatial_dims=3)
    with pytest.raises(DataError, match="data.spatial_dims=3 .*data.source=folder.*set data.spatial_dims=2 or null"):
        load_folder_sites(cfg)
    assert load_folder_sites(cfg.model_copy(update={"spatial_dims": None}))[0].spatial_dims == 2


def test_2d_is_unchanged_by_default_and_with_spatial_dims_2():
    assert DataConfig().spatial_dims is None
    cfg = DataConfig(num_sites=2, samples_per_site=30, image_size=16)
    plain, explicit = load_synthetic_sites(cfg), load_synthetic_sites(cfg.model_copy(update={"spatial_dims": 2}))
    for a, b in zip(plain, explicit):
        assert a.spatial_dims == 2 and a.train.images.shape[1:] == (1, 16, 16)
        assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert dataset_info(cfg).spatial_dims == 2
