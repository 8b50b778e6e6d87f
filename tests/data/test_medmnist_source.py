import hashlib
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import fedfm.data.medmnist as mm
from fedfm.config import DataConfig
from fedfm.data import dataset_info, label_counts
from fedfm.data.errors import DataError
from fedfm.data.medmnist import load_medmnist_sites

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COUNTS = {"train": 60, "val": 15, "test": 24}
BASE = {"train": 0, "val": 70, "test": 100}  # image value ranges per split, so provenance is visible


def write_npz(path: Path, classes: int = 2, rgb: bool = False, sites: int | None = None, names=None) -> Path:
    """Tiny 8x8 MedMNIST-like file; image i of a split is the constant BASE+i, its label (BASE+i) % classes."""
    arrays = {}
    for split, n in COUNTS.items():
        values = (BASE[split] + np.arange(n)).astype(np.uint8)
        images = np.broadcast_to(values[:, None, None], (n, 8, 8))
        if rgb:
            images = np.stack([images, images, 255 - images], axis=-1)
        arrays[f"{split}_images"] = np.ascontiguousarray(images)
        arrays[f"{split}_labels"] = (values % classes).astype(np.uint8)[:, None]
        if sites:
            arrays[f"{split}_sites"] = np.arange(n) % sites
    if names is not None:
        arrays["site_names"] = np.array(names)
    np.savez(path, **arrays)
    return path


def values_of(images: np.ndarray) -> np.ndarray:
    flat = np.round(images[:, 0] * 255).reshape(len(images), -1)
    assert np.all(flat == flat[:, :1]), "constant images stay constant through the resize"
    return flat[:, 0].astype(int)


def cfg_for(path: Path, **kw) -> DataConfig:
    base = dict(source="medmnist", path=str(path), num_sites=3, image_size=32, site_shift=0.0)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("classes,rgb", [(2, False), (4, False), (2, True), (5, True)])
def test_official_splits_preserved(tmp_path, classes, rgb):
    npz = write_npz(tmp_path / "tiny.npz", classes=classes, rgb=rgb)
    partition = "dirichlet" if classes > 2 else "iid"
    sites = load_medmnist_sites(cfg_for(npz, num_classes=classes, partition=partition, alpha=1.0))
    assert len(sites) == 3
    for split, n in COUNTS.items():
        seen = []
        for s in sites:
            part = getattr(s, split)
            assert part.images.shape[1:] == ((3 if rgb else 1), 32, 32)
            values = values_of(part.images)
            assert np.all((values >= BASE[split]) & (values < BASE[split] + n)), f"{split} from {split}_images only"
            assert np.array_equal(part.labels, values % classes), "image/label pairs kept together"
            seen.extend(values.tolist())
        assert sorted(seen) == list(range(BASE[split], BASE[split] + n)), "sites share out the whole split"
    if rgb:
        assert np.allclose(sites[0].train.images[:, 2], 1.0 - sites[0].train.images[:, 0], atol=1e-6)
    assert all(s.channels == (3 if rgb else 1) and s.num_classes == classes for s in sites)


def test_natural_partition_uses_site_ids_and_names(tmp_path):
    npz = write_npz(tmp_path / "nat.npz", sites=3, names=["north", "south", "east"])
    sites = load_medmnist_sites(cfg_for(npz, partition="natural"))
    assert [s.name for s in sites] == ["north", "south", "east"]
    for s in sites:
        for split in COUNTS:
            values = values_of(getattr(s, split).images)
            assert np.all((values - BASE[split]) % 3 == s.site_id)


def test_natural_partition_errors(tmp_path):
    plain = write_npz(tmp_path / "plain.npz")
    with pytest.raises(DataError, match="train_sites"):
        load_medmnist_sites(cfg_for(plain, partition="natural"))
    four = write_npz(tmp_path / "four.npz", sites=4)
    with pytest.raises(DataError, match="data.num_sites=3 .* set data.num_sites=4"):
        load_medmnist_sites(cfg_for(four, partition="natural"))


def test_too_many_classes_and_missing_path(tmp_path):
    npz = write_npz(tmp_path / "multi.npz", classes=4)
    with pytest.raises(DataError, match="set data.num_classes=4"):
        load_medmnist_sites(cfg_for(npz, num_classes=2))
    with pytest.raises(DataError, match="data.path '.*nope.npz' does not exist"):
        load_medmnist_sites(cfg_for(tmp_path / "nope.npz"))


def test_site_shift_applied_when_asked(tmp_path):
    npz = write_npz(tmp_path / "tiny.npz")
    sites = load_medmnist_sites(cfg_for(npz, site_shift=1.0))
    assert all(s.shift for s in sites)
    means = [s.train.images.mean() for s in sites]
    plain = [s.train.images.mean() for s in load_medmnist_sites(cfg_for(npz))]
    assert np.ptp(means) > np.ptp(plain) + 0.01


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_by_name_with_md5_check(tmp_path, monkeypatch):
    source = write_npz(tmp_path / "remote.npz", classes=3)
    info = {"tinymnist": {"url": source.as_uri(), "MD5": md5(source)}}
    monkeypatch.setattr(mm, "medmnist_info", lambda: info)
    cfg = DataConfig(
        source="medmnist", name="tinymnist", download_dir=str(tmp_path / "dl"), num_classes=3, site_shift=0
    )
    sites = load_medmnist_sites(cfg)
    assert (tmp_path / "dl" / "tinymnist.npz").is_file()
    assert sum(len(s.train) for s in sites) == COUNTS["train"]

    def no_network(*args, **kwargs):
        raise AssertionError("an intact download must be reused")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert sum(len(s.test) for s in load_medmnist_sites(cfg)) == COUNTS["test"]


def test_download_md5_mismatch_is_an_error(tmp_path, monkeypatch):
    source = write_npz(tmp_path / "remote.npz")
    info = {"tinymnist": {"url": source.as_uri(), "MD5": "0" * 32}}
    monkeypatch.setattr(mm, "medmnist_info", lambda: info)
    cfg = DataConfig(source="medmnist", name="tinymnist", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError, match="MD5"):
        load_medmnist_sites(cfg)
    assert not list((tmp_path / "dl").iterdir()), "a bad download is not left behind"


def test_download_sized_variant_and_unknown_name(tmp_path, monkeypatch):
    source = write_npz(tmp_path / "remote.npz")
    info = {"tinymnist": {"url": "file:///nowhere", "MD5": "x", "url_64": source.as_uri(), "MD5_64": md5(source)}}
    monkeypatch.setattr(mm, "medmnist_info", lambda: info)
    assert mm.download_npz("tinymnist_64", str(tmp_path / "dl")).name == "tinymnist_64.npz"
    with pytest.raises(DataError, match="data.name 'nosuchmnist' is not a MedMNIST dataset"):
        mm.download_npz("nosuchmnist", str(tmp_path / "dl"))


def test_missing_medmnist_package_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "medmnist", None)
    monkeypatch.setitem(sys.modules, "medmnist.info", None)
    cfg = DataConfig(source="medmnist", name="pneumoniamnist", download_dir=str(tmp_path))
    with pytest.raises(DataError, match="pip install .*medmnist.*data.path"):
        load_medmnist_sites(cfg)


def test_real_pneumoniamnist():
    path = SHARED / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    cfg = DataConfig(source="medmnist", path=str(path), num_sites=3, image_size=28, site_shift=0.0)
    sites = load_medmnist_sites(cfg)
    with np.load(path) as raw:
        official = {s: raw[f"{s}_images"] for s in ("train", "val", "test")}
        labels = {s: raw[f"{s}_labels"].ravel() for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        assert sum(len(getattr(s, split)) for s in sites) == len(official[split])
        totals = np.sum([label_counts(getattr(s, split), 2) for s in sites], axis=0)
        assert totals.tolist() == np.bincount(labels[split], minlength=2).tolist()
    known = {img.tobytes() for img in official["train"]}
    site_train = np.round(sites[1].train.images[:, 0] * 255).astype(np.uint8)
    assert all(img.tobytes() in known for img in site_train)
    info = dataset_info(cfg.model_copy(update={"image_size": 32}))
    assert (info.num_classes, info.channels, info.image_size) == (2, 1, 32)
