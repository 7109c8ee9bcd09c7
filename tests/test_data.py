"""Datasets: sizes, the stable index order that artifacts refer to, targets, bad images, DATA_LIMIT."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clusterfit.config import Config, config_from_args, load_config
from clusterfit.data import BadImageError, DatasetError, build_dataset, build_source, eval_transform


def config(partition: str = "TRAIN", **split: Any) -> Config:
    return load_config(overrides={"DATA": {partition: split}})


def png(color: tuple[int, int, int], size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root: Path, tree: dict[str, tuple[int, int, int]]) -> None:
    for key, color in tree.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(png(color))


def torchvision_order(root: Path) -> list[tuple[str, int]]:
    """torchvision's ImageFolder (the order the module promises), as (relative path, target)."""
    from torchvision.datasets import ImageFolder

    return [(Path(path).relative_to(root).as_posix(), target) for path, target in ImageFolder(str(root)).samples]


def folder_order(source: Any, root: Path) -> list[tuple[str, int]]:
    prefix = root.as_uri() + "/"
    names = [source.name(i) for i in range(len(source))]
    assert all(name.startswith(prefix) for name in names), names
    return [(name[len(prefix) :], int(t)) for name, t in zip(names, source.targets, strict=True)]


# ---------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_sizes_targets_and_pixels() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = build_source(config("TRAIN", DATA_SOURCES=["digits"], IMAGE_SIZE=8), "TRAIN")
    test = build_source(config("TEST", DATA_SOURCES=["digits"], IMAGE_SIZE=8), "TEST")
    assert (len(train), len(test)) == (1437, 360)
    train_index = [i for i in range(len(digits.target)) if i % 5 != 0]
    test_index = list(range(0, len(digits.target), 5))
    assert train.targets is not None and test.targets is not None
    assert train.targets.dtype == np.int64
    np.testing.assert_array_equal(train.targets, digits.target[train_index])
    np.testing.assert_array_equal(test.targets, digits.target[test_index])
    for source, index in ((train, train_index), (test, test_index)):
        for i in (0, 1, len(source) - 1):
            image = source.load(i)
            assert image.mode == "RGB" and image.size == (8, 8)
            pixels = np.asarray(image)
            expected = (digits.images[index[i]] * (255.0 / 16.0)).astype(np.uint8)
            for channel in range(3):
                np.testing.assert_array_equal(pixels[:, :, channel], expected)


def test_digits_upsampled_for_the_network() -> None:
    cfg = config_from_args(["config=quickstart"])
    dataset = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    image, index, problem = dataset[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert (index, problem) == (5, "")


def test_synthetic_is_deterministic_and_balanced() -> None:
    cfg = config("TRAIN", DATA_SOURCES=["synthetic"], SYNTHETIC_SIZE=30, IMAGE_SIZE=8)
    first, second = build_source(cfg, "TRAIN"), build_source(cfg, "TRAIN")
    assert len(first) == 30 and first.targets is not None
    assert np.bincount(first.targets).tolist() == [3] * 10
    assert np.array_equal(np.asarray(first.load(7)), np.asarray(second.load(7)))
    assert not np.array_equal(np.asarray(first.load(7)), np.asarray(first.load(17)))
    other_seed = load_config(
        overrides={"EXPERIMENT": {"SEED": 1}, "DATA": {"TRAIN": {"DATA_SOURCES": ["synthetic"], "IMAGE_SIZE": 8}}}
    )
    assert not np.array_equal(np.asarray(build_source(other_seed, "TRAIN").load(7)), np.asarray(first.load(7)))


@pytest.mark.parametrize("limit, expected", [(7, 7), (0, 0), (-1, 50), (500, 50)])
def test_data_limit_keeps_the_first_images_in_order(limit: int, expected: int) -> None:
    full = build_source(config("TRAIN", DATA_SOURCES=["synthetic"], SYNTHETIC_SIZE=50, IMAGE_SIZE=8), "TRAIN")
    cut = build_source(
        config("TRAIN", DATA_SOURCES=["synthetic"], SYNTHETIC_SIZE=50, IMAGE_SIZE=8, DATA_LIMIT=limit), "TRAIN"
    )
    assert len(cut) == expected
    assert cut.targets is not None and full.targets is not None
    np.testing.assert_array_equal(cut.targets, full.targets[:expected])
    if expected:
        last = expected - 1
        assert cut.name(last) == full.name(last)
        assert np.array_equal(np.asarray(cut.load(last)), np.asarray(full.load(last)))


def test_data_limit_on_digits() -> None:
    cut = build_source(config("TRAIN", DATA_SOURCES=["digits"], DATA_LIMIT=100), "TRAIN")
    full = build_source(config("TRAIN", DATA_SOURCES=["digits"]), "TRAIN")
    assert len(cut) == 100 and cut.targets is not None and full.targets is not None
    np.testing.assert_array_equal(cut.targets, full.targets[:100])


def test_unconfigured_split_is_an_error_naming_the_key() -> None:
    with pytest.raises(DatasetError, match=r"DATA\.TEST\.DATA_SOURCES"):
        build_source(config_from_args([]), "TEST")


# ---------------------------------------------------------------------------------------------
# disk_folder


TREE = {
    "zebra/10.png": (200, 0, 0),
    "zebra/2.png": (201, 0, 0),
    "zebra/b.jpg.txt": (0, 0, 0),  # not an image: ignored
    "Apple/x.png": (1, 2, 3),  # upper case sorts first, as in torchvision
    "apple/b.png": (0, 100, 0),
    "apple/a.png": (0, 101, 0),
    "mango/only.PNG": (0, 0, 50),
}


def test_disk_folder_order_and_targets_match_torchvision(tmp_path: Path) -> None:
    write_tree(tmp_path, TREE)
    (tmp_path / "loose.png").write_bytes(png((9, 9, 9)))  # not in a class folder: ignored
    source: Any = build_source(config("TRAIN", DATA_SOURCES=["disk_folder"], DATA_PATHS=[str(tmp_path)]), "TRAIN")
    expected = torchvision_order(tmp_path)
    assert expected[0] == ("Apple/x.png", 0) and expected[-1] == ("zebra/2.png", 3)
    assert folder_order(source, tmp_path) == expected
    assert source.classes == ["Apple", "apple", "mango", "zebra"]
    assert source.targets.dtype == np.int64
    for i, (key, _) in enumerate(expected):
        assert source.load(i).getpixel((1, 1)) == TREE[key]


def test_disk_folder_nested_subfolders_order_like_torchvision(tmp_path: Path) -> None:
    # A class folder with sub-folders: torchvision lists a folder's own files before its sub-folders'.
    write_tree(
        tmp_path, {"cat/z.png": (1, 1, 1), "cat/sub/a.png": (2, 2, 2), "cat/a.png": (3, 3, 3), "dog/d.png": (4, 4, 4)}
    )
    source: Any = build_source(config("TRAIN", DATA_SOURCES=["disk_folder"], DATA_PATHS=[tmp_path.as_uri()]), "TRAIN")
    assert folder_order(source, tmp_path) == torchvision_order(tmp_path)


def test_disk_folder_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(DatasetError) as err:
        build_source(config("TRAIN", DATA_SOURCES=["disk_folder"], DATA_PATHS=[str(missing)]), "TRAIN")
    assert str(missing) in str(err.value) and "DATA.TRAIN.DATA_PATHS" in str(err.value)


def test_disk_folder_without_images_names_it(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError) as err:
        build_source(config("TRAIN", DATA_SOURCES=["disk_folder"], DATA_PATHS=[str(tmp_path)]), "TRAIN")
    assert str(tmp_path) in str(err.value) and "no images" in str(err.value)


# ---------------------------------------------------------------------------------------------
# disk_filelist


def test_disk_filelist_with_labels_keeps_the_file_order(tmp_path: Path) -> None:
    write_tree(tmp_path, {"imgs/b.png": (10, 0, 0), "imgs/a.png": (20, 0, 0), "other/c.png": (30, 0, 0)})
    listing = tmp_path / "train.txt"
    listing.write_text("# path,label\nimgs/b.png,3\n\nimgs/a.png, 1\nother/c.png,0\n")
    source: Any = build_source(config("TRAIN", DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(listing)]), "TRAIN")
    assert len(source) == 3
    assert source.targets.tolist() == [3, 1, 0] and source.targets.dtype == np.int64
    assert [source.name(i) for i in range(3)] == [
        (tmp_path / k).as_uri() for k in ("imgs/b.png", "imgs/a.png", "other/c.png")
    ]
    assert [source.load(i).getpixel((0, 0))[0] for i in range(3)] == [10, 20, 30]


def test_disk_filelist_without_labels(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a.png": (1, 1, 1), "b.png": (2, 2, 2)})
    (tmp_path / "list.txt").write_text("b.png\na.png\n")
    source: Any = build_source(
        config("TRAIN", DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(tmp_path / "list.txt")]), "TRAIN"
    )
    assert len(source) == 2 and source.targets is None
    assert source.load(0).getpixel((0, 0)) == (2, 2, 2)


@pytest.mark.parametrize(
    "text, needle",
    [("a.png,1\nb.png\n", "label all or none"), ("a.png,1\nb.png,cat\n", ":2: label 'cat'")],
    ids=["partial", "not-int"],
)
def test_disk_filelist_bad_labels_name_the_file(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(DatasetError) as err:
        build_source(config("TRAIN", DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(tmp_path / "list.txt")]), "TRAIN")
    assert "list.txt" in str(err.value) and needle in str(err.value)


def test_disk_filelist_missing_list_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        build_source(config("TRAIN", DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(tmp_path / "nope.txt")]), "TRAIN")
    assert "nope.txt" in str(err.value) and "DATA.TRAIN.DATA_PATHS" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Unreadable images


@pytest.fixture
def tree_with_bad_images(tmp_path: Path) -> Path:
    write_tree(tmp_path, {"a/good.png": (5, 5, 5), "b/good.png": (6, 6, 6)})
    (tmp_path / "a" / "garbage.png").write_bytes(b"this is not a png")
    (tmp_path / "b" / "truncated.png").write_bytes(png((7, 7, 7), size=64)[:60])
    return tmp_path


def folder_dataset(root: Path, on_bad_image: str) -> Any:
    cfg = load_config(
        overrides={
            "DATA": {
                "TRAIN": {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(root)]},
                "ON_BAD_IMAGE": on_bad_image,
                "TRANSFORMS": {"EVAL_RESIZE": 8, "EVAL_CROP_SIZE": 8},
            }
        }
    )
    return build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))


def test_corrupt_image_is_an_error_naming_the_file(tree_with_bad_images: Path) -> None:
    dataset = folder_dataset(tree_with_bad_images, "error")
    names = [dataset.source.name(i) for i in range(len(dataset))]
    assert [n.rsplit("/", 2)[-2:] for n in names] == [
        ["a", "garbage.png"],
        ["a", "good.png"],
        ["b", "good.png"],
        ["b", "truncated.png"],
    ]
    for index in (0, 3):
        with pytest.raises(BadImageError) as err:
            dataset[index]
        print(err.value)
        assert names[index] in str(err.value)
    assert dataset[1][2] == ""


def test_corrupt_image_skipped_when_configured(tree_with_bad_images: Path) -> None:
    dataset = folder_dataset(tree_with_bad_images, "skip")
    items = [dataset[i] for i in range(len(dataset))]
    problems = [(index, problem) for _, index, problem in items]
    assert problems == [(0, "not_an_image"), (1, ""), (2, ""), (3, "truncated")]
    assert all(image.shape == (3, 8, 8) for image, _, _ in items)
    assert torch.count_nonzero(items[0][0]) == 0 and torch.count_nonzero(items[1][0]) > 0
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch[1].tolist() == [0, 1, 2, 3] and list(batch[2]) == ["not_an_image", "", "", "truncated"]


# ---------------------------------------------------------------------------------------------
# DATA_LIMIT_SAMPLING and the class list of TEST


def classes_tree(root: Path, classes: dict[str, int]) -> None:
    write_tree(
        root,
        {f"{c}/{i:02d}.png": (n * 40, i * 9, 0) for n, (c, count) in enumerate(classes.items()) for i in range(count)},
    )


def test_data_limit_on_a_folder_samples_at_random_with_vissls_seeded_draw(tmp_path: Path) -> None:
    classes_tree(tmp_path, {"a": 5, "b": 5, "c": 5, "d": 5})
    split = {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path)]}
    full = build_source(config("TRAIN", **split), "TRAIN")
    cut = build_source(config("TRAIN", **split, DATA_LIMIT=8), "TRAIN")
    # VISSL's unbalanced_sub_sampling: numpy's legacy seeded choice of SKIP + N indices without replacement.
    oracle = np.sort(np.random.RandomState(0).choice(20, 8, replace=False))
    assert [cut.name(i) for i in range(8)] == [full.name(int(i)) for i in oracle]
    assert full.targets is not None and cut.targets is not None
    np.testing.assert_array_equal(cut.targets, full.targets[oracle])
    assert len(set(cut.targets.tolist())) > 2  # the first 8 images would be classes a and b only
    reseeded = build_source(config("TRAIN", **split, DATA_LIMIT=8, DATA_LIMIT_SAMPLING={"SEED": 5}), "TRAIN")
    assert [reseeded.name(i) for i in range(8)] != [cut.name(i) for i in range(8)]
    skipped = build_source(config("TRAIN", **split, DATA_LIMIT=8, DATA_LIMIT_SAMPLING={"SKIP_NUM_SAMPLES": 3}), "TRAIN")
    skip_oracle = np.sort(np.random.RandomState(0).choice(20, 11, replace=False)[3:])
    assert [skipped.name(i) for i in range(8)] == [full.name(int(i)) for i in skip_oracle]


def test_balanced_data_limit_gives_every_class_its_share(tmp_path: Path) -> None:
    classes_tree(tmp_path, {"a": 9, "b": 3, "c": 6})
    split = {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path)], "DATA_LIMIT": 7}
    cut = build_source(config("TRAIN", **split, DATA_LIMIT_SAMPLING={"IS_BALANCED": True}), "TRAIN")
    assert cut.targets is not None
    assert np.bincount(cut.targets).tolist() == [3, 2, 2]  # differ by at most one, the remainder to the first


def test_balanced_data_limit_needs_labels(tmp_path: Path) -> None:
    write_tree(tmp_path, {"x.png": (1, 2, 3), "y.png": (4, 5, 6)})
    (tmp_path / "list.txt").write_text("x.png\ny.png\n")
    cfg = config(
        "TRAIN",
        DATA_SOURCES=["disk_filelist"],
        DATA_PATHS=[str(tmp_path / "list.txt")],
        DATA_LIMIT=1,
        DATA_LIMIT_SAMPLING={"IS_BALANCED": True},
    )
    with pytest.raises(DatasetError, match=r"DATA\.TRAIN\.DATA_LIMIT_SAMPLING\.IS_BALANCED"):
        build_source(cfg, "TRAIN")


def test_data_limit_first_images_when_asked(tmp_path: Path) -> None:
    classes_tree(tmp_path, {"a": 5, "b": 5})
    split = {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path)], "DATA_LIMIT": 4}
    cut = build_source(config("TRAIN", **split, DATA_LIMIT_SAMPLING={"METHOD": "first"}), "TRAIN")
    assert cut.targets is not None and cut.targets.tolist() == [0, 0, 0, 0]


def test_test_class_ids_follow_the_train_class_list(tmp_path: Path) -> None:
    classes_tree(tmp_path / "train", {"ant": 2, "bee": 2, "cow": 2})
    classes_tree(tmp_path / "test", {"ant": 1, "cow": 1})  # no bee: cow must stay class 2
    cfg = load_config(
        overrides={
            "DATA": {
                "TRAIN": {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path / "train")]},
                "TEST": {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path / "test")]},
            }
        }
    )
    test = build_source(cfg, "TEST")
    assert test.targets is not None and test.targets.tolist() == [0, 2]


def test_a_test_class_that_train_lacks_is_named(tmp_path: Path) -> None:
    classes_tree(tmp_path / "train", {"ant": 2, "bee": 2})
    classes_tree(tmp_path / "test", {"ant": 1, "emu": 1})
    cfg = load_config(
        overrides={
            "DATA": {
                "TRAIN": {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path / "train")]},
                "TEST": {"DATA_SOURCES": ["disk_folder"], "DATA_PATHS": [str(tmp_path / "test")]},
            }
        }
    )
    with pytest.raises(DatasetError) as error:
        build_source(cfg, "TEST")
    assert "'emu'" in str(error.value) and str(tmp_path / "test") in str(error.value)
    assert "DATA.TRAIN.DATA_PATHS" in str(error.value)


def test_disk_filelist_entries_may_be_absolute_or_climb_out_of_the_lists_folder(tmp_path: Path) -> None:
    write_tree(tmp_path, {"imgs/a.png": (10, 0, 0), "imgs/b.png": (20, 0, 0)})
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "train.txt"
    absolute = str(tmp_path / "imgs" / "b.png")  # VISSL's file lists hold absolute paths
    listing.write_text(f"../imgs/a.png,0\n{absolute},1\n")
    source: Any = build_source(config("TRAIN", DATA_SOURCES=["disk_filelist"], DATA_PATHS=[str(listing)]), "TRAIN")
    assert [source.load(i).getpixel((0, 0))[0] for i in range(2)] == [10, 20]
    assert [source.name(i) for i in range(2)] == [(tmp_path / "imgs" / n).as_uri() for n in ("a.png", "b.png")]
    assert [source.key(i) for i in range(2)] == ["../imgs/a.png", absolute]  # the identity: as the list spells it


def test_a_listed_key_the_store_refuses_is_a_bad_image_naming_it(tmp_path: Path) -> None:
    from clusterfit.image_files import FileSource
    from clusterfit.storage import open_store

    source = FileSource(open_store(tmp_path.as_uri()), ["cat//a.png"], None, [])  # S3 listings can hold such keys
    with pytest.raises(BadImageError, match=r"cat/a\.png: cannot read image \(bad_name\): .*segment"):
        source.load(0)  # DATA.ON_BAD_IMAGE decides what then
