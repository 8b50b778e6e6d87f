from pathlib import Path

import numpy as np
import pytest

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.folder import load_folder_sites, read_image
from fedfm.data.png import write_png

LEVEL = {"benign": 40, "malignant": 120, "normal": 200}  # class -> constant gray level


def put(path: Path, cls: str, i: int, size: tuple[int, int] = (8, 8), rgb: bool = False, npy: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    img = np.full(size, LEVEL[cls], np.uint8)
    if rgb:
        img = np.stack([img, img, img], axis=-1)
    if npy:
        np.save(path / f"{i}.npy", img)
    else:
        write_png(path / f"{i}.png", img)


def label_names(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    levels = np.round(images[:, 0].mean(axis=(1, 2)) * 255).astype(int)
    assert [classes[l] for l in labels] == [min(LEVEL, key=lambda c: abs(LEVEL[c] - v)) for v in levels]


def make_flat_tree(root: Path) -> None:
    # hospital_a lacks "benign"; hospital_b lacks "normal": class index must still be global
    for i in range(10):
        put(root / "hospital_a" / "malignant", "malignant", i, size=(10, 12))
        put(root / "hospital_a" / "normal", "normal", i)
        put(root / "hospital_b" / "benign", "benign", i, npy=True)
        put(root / "hospital_b" / "malignant", "malignant", i, size=(40, 40))


def test_flat_layout_splits_and_global_classes(tmp_path):
    make_flat_tree(tmp_path)
    cfg = DataConfig(source="folder", path=str(tmp_path), num_sites=2, num_classes=3, image_size=16,
                     val_fraction=0.1, test_fraction=0.2, site_shift=0.0)
    sites = load_folder_sites(cfg)
    assert [s.name for s in sites] == ["hospital_a", "hospital_b"]
    classes = sorted(LEVEL)
    for s in sites:
        assert (len(s.train), len(s.val), len(s.test)) == (14, 2, 4)
        assert s.train.images.shape[1:] == (1, 16, 16) and s.num_classes == 3 and s.channels == 1
        for split in (s.train, s.val, s.test):
            label_names(split.images, split.labels, classes)
    assert set(np.concatenate([sites[0].train.labels, sites[0].test.labels]).tolist()) == {1, 2}
    assert set(np.concatenate([sites[1].train.labels, sites[1].test.labels]).tolist()) == {0, 1}
    again = load_folder_sites(cfg)
    assert np.array_equal(again[0].test.images, sites[0].test.images)


def test_split_layout_and_rgb_promotion(tmp_path):
    for site in ("s1", "s2"):
        for i in range(4):
            put(tmp_path / site / "train" / "benign", "benign", i)
            put(tmp_path / site / "train" / "normal", "normal", i, rgb=(site == "s2"))
        put(tmp_path / site / "test" / "normal", "normal", 0)
        put(tmp_path / site / "test" / "benign", "benign", 0)
    put(tmp_path / "s1" / "val" / "normal", "normal", 0)
    cfg = DataConfig(source="folder", path=str(tmp_path), num_sites=2, image_size=8, site_shift=0.0)
    sites = load_folder_sites(cfg)
    assert [(len(s.train), len(s.val), len(s.test)) for s in sites] == [(8, 1, 2), (8, 0, 2)]
    assert all(s.channels == 3 for s in sites), "one RGB image makes every site RGB"
    assert sites[1].val.images.shape == (0, 3, 8, 8)
    classes = ["benign", "normal"]
    label_names(sites[0].train.images, sites[0].train.labels, classes)
    assert np.array_equal(sites[0].train.images[:, 0], sites[0].train.images[:, 2])


def test_mismatched_num_sites_and_classes(tmp_path):
    make_flat_tree(tmp_path)
    with pytest.raises(DataError, match="data.num_sites=3 .* 2 site folders .* set data.num_sites=2"):
        load_folder_sites(DataConfig(source="folder", path=str(tmp_path), num_sites=3, num_classes=3))
    with pytest.raises(DataError, match="set data.num_classes=3"):
        load_folder_sites(DataConfig(source="folder", path=str(tmp_path), num_sites=2, num_classes=2))
    with pytest.raises(DataError, match="is not a folder"):
        load_folder_sites(DataConfig(source="folder", path=str(tmp_path / "missing")))


def test_read_image_formats(tmp_path):
    np.save(tmp_path / "raw.npy", np.array([[0.0, 500.0], [1000.0, 250.0]], np.float32))
    assert np.allclose(read_image(tmp_path / "raw.npy")[0], [[0, 0.5], [1, 0.25]])
    np.save(tmp_path / "chw.npy", np.zeros((3, 5, 6), np.uint8))
    assert read_image(tmp_path / "chw.npy").shape == (3, 5, 6)
    write_png(tmp_path / "rgba.png", np.full((4, 5, 4), 255, np.uint8))
    assert read_image(tmp_path / "rgba.png").shape == (3, 4, 5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png")
