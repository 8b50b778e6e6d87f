"""The facts of a folder dataset, from its tree and its images' headers (no image is decoded).

The checks are the loader's own (:mod:`fedfm.data.folder`), plus those only a run as a whole can
fail: at least two classes, and every class at every site. Classes are the union of the sites'
class folders, so a site without one (often a misspelled folder name) would train on fewer
classes than the federation has and never see the others.
"""

from __future__ import annotations

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.folder import check_classes_fit, image_channels, scan_tree, site_folders
from fedfm.data.inspect import DataFacts
from fedfm.data.sites import SPLITS
from fedfm.data.splits import split_counts


def folder_facts(cfg: DataConfig) -> DataFacts:
    root, sites = site_folders(cfg)
    classes, files = scan_tree(root, sites)
    check_classes_fit(cfg, classes)  # before the other class checks, as the loader does
    where = f"data.path '{cfg.path}'"
    listed = ", ".join(classes[:10])
    if len(classes) < 2:
        raise DataError(
            f"{where} has {len(classes)} class folder{'s' if len(classes) != 1 else ''} ({listed or 'none'}): "
            "a classification task needs at least 2; give each site one folder of images per class"
        )
    sizes: dict[str, dict[str, int]] = {}
    for site in sites:
        seen = {cls for (name, _), entries in files.items() if name == site.name for _, cls in entries}
        missing = [c for c in classes if c not in seen]
        if missing:
            raise DataError(
                f"{where}: site folder '{site.name}' has no images of class {', '.join(missing[:10])} "
                f"(the classes are every site's class folders: {listed}): add its images there, "
                "or fix a misspelled class folder name"
            )
        pooled = files.get((site.name, ""))
        if pooled is not None:
            train, val, test = split_counts(len(pooled), cfg.val_fraction, cfg.test_fraction)
            sizes[site.name] = {"train": train, "val": val, "test": test}
        else:
            sizes[site.name] = {s: len(files.get((site.name, s), [])) for s in SPLITS}
    channels = max(image_channels(path) for entries in files.values() for path, _ in entries)
    return DataFacts(root.resolve().name, where, len(classes), f"has {len(classes)} class folders ({listed})",
                     channels, 2, cfg.image_size, None, tuple(s.name for s in sites), sizes)
