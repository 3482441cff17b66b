"""mini-ImageNet, CIFAR-FS and FC100 loaders on tiny synthetic stand-ins written in their real
on-disk formats (no network): parsing, the papers' class counts per split, and the offline
error that lists the paths tried."""
import csv
import json
import pickle

import numpy as np
import pytest
import torch

from anil_fast.data import TaskSampler, load_benchmark
from anil_fast.data.benchmarks import published_splits

# CIFAR-100's superclasses and their classes, as its meta file names them
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE = sorted(n for names in CIFAR100.values() for n in names)
COARSE = sorted(CIFAR100)
COARSE_OF = {n: COARSE.index(c) for c, names in CIFAR100.items() for n in names}


def write_cifar100(root, per_class=(2, 1)):
    """cifar-100-python/{train,test,meta} as the official archive holds them (python pickles of
    dicts with uint8 rows of 3,072 bytes); each image's pixels hold its fine label."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in zip(("train", "test"), per_class):
        fine = [f for f in range(100) for _ in range(count)]
        data = np.repeat(np.array(fine, dtype=np.uint8)[:, None], 3072, axis=1)
        part = {"filenames": [f"{i}.png" for i in range(len(fine))], "fine_labels": fine,
                "coarse_labels": [COARSE_OF[FINE[f]] for f in fine], "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(part, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": FINE, "coarse_label_names": COARSE}, f, protocol=2)
    return root


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIL_FAST_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("ANIL_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANIL_FAST_OFFLINE", "1")
    return tmp_path


def test_published_splits_are_complete():
    splits = published_splits()
    cifar_fs = [splits["cifar-fs"][s] for s in ("train", "validation", "test")]
    assert [len(c) for c in cifar_fs] == [64, 16, 20]
    assert sorted(sum(cifar_fs, [])) == FINE
    fc100 = [splits["fc100"][s] for s in ("train", "validation", "test")]
    assert [len(c) for c in fc100] == [12, 4, 4] and sorted(sum(fc100, [])) == COARSE
    assert "Bertinetto" in splits["cifar-fs"]["cite"] and "Oreshkin" in splits["fc100"]["cite"]


@pytest.mark.parametrize("split, classes", [("train", 64), ("validation", 16), ("test", 20)])
def test_cifar_fs_from_the_official_format(no_data, split, classes):
    root = write_cifar100(no_data / "c")
    data = load_benchmark("cifar-fs", split, root=root)
    assert data.num_classes == classes and data.counts.tolist() == [3] * classes
    assert data.pixels.shape[1:] == (3, 32, 32) and data.pixels.dtype == torch.uint8
    assert data.class_names == published_splits()["cifar-fs"][split]
    for c, name in enumerate(data.class_names):  # every image is its class's
        rows = data.pixels[int(data.offsets[c]):int(data.offsets[c] + data.counts[c])]
        assert (rows == FINE.index(name)).all()
    batch = TaskSampler(data, 5, 1, 2, 3).sample()
    assert batch.support_x.shape == (3, 5, 3, 32, 32)


@pytest.mark.parametrize("split, classes", [("train", 60), ("validation", 20), ("test", 20)])
def test_fc100_from_the_official_format(no_data, split, classes):
    root = write_cifar100(no_data / "c")
    data = load_benchmark("fc100", split, root=root, image_size=16)
    assert data.num_classes == classes and data.pixels.shape[1:] == (3, 16, 16)
    superclasses = set(published_splits()["fc100"][split])
    assert {COARSE[COARSE_OF[n]] for n in data.class_names} == superclasses


def test_cifar_pickles_build_nothing_but_arrays(no_data):
    root = write_cifar100(no_data / "c")
    marker = no_data / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))
    with open(root / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": Evil()}, f)
    with pytest.raises(ValueError, match="refused to build"):
        load_benchmark("cifar-fs", "train", root=root)
    assert not marker.exists()


def test_cifar_offline_error_lists_the_paths_tried(no_data):
    with pytest.raises(FileNotFoundError, match="Paths tried") as info:
        load_benchmark("fc100", "train", root=no_data / "mine")
    message = str(info.value)
    assert str(no_data / "mine") in message and str(no_data / "nothing" / "cifar100") in message
    assert "ANIL_FAST_OFFLINE=1" in message
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_benchmark("cifar-fs", "test", root=no_data / "mine", download=False)


def write_mini_imagenet(root, counts=(64, 16, 20), per_class=2):
    from PIL import Image
    (root / "images").mkdir(parents=True)
    wnid = 0
    for split, classes in zip(("train", "val", "test"), counts):
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for _ in range(classes):
                name = f"n{wnid:08d}"
                for e in range(per_class):
                    file = f"{name}{e:08d}.jpg"
                    Image.new("RGB", (20, 20), (wnid % 256, 0, 0)).save(root / "images" / file)
                    writer.writerow([file, name])
                wnid += 1
    return root


@pytest.mark.parametrize("split, classes", [("train", 64), ("validation", 16), ("test", 20)])
def test_mini_imagenet_from_the_ravi_csvs(no_data, split, classes):
    root = write_mini_imagenet(no_data / "mini")
    data = load_benchmark("mini-imagenet", split, image_size=12, root=root)
    assert data.num_classes == classes and data.counts.tolist() == [2] * classes
    assert data.pixels.shape[1:] == (3, 12, 12)
    first = int(data.class_names[0][1:])
    assert abs(int(data.pixels[0, 0, 6, 6]) - first % 256) <= 3


def test_mini_imagenet_errors(no_data):
    with pytest.raises(FileNotFoundError, match="Paths tried") as info:
        load_benchmark("mini-imagenet", "train", root=no_data / "mine")
    assert "train.csv" in str(info.value) and str(no_data / "mine") in str(info.value)
    root = write_mini_imagenet(no_data / "mini", counts=(63, 16, 20))
    with pytest.raises(ValueError, match="64 classes"):
        load_benchmark("mini-imagenet", "train", 12, root=root)
    good_test = (root / "test.csv").read_text()
    (root / "test.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="header"):
        load_benchmark("mini-imagenet", "test", 12, root=root)
    (root / "test.csv").write_text(good_test)
    rows = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(rows + ["missing.jpg,n99999999"]) + "\n")
    with pytest.raises(ValueError, match="17|missing"):
        load_benchmark("mini-imagenet", "validation", 12, root=root)


def test_benchmark_presets_build_from_the_data(no_data, monkeypatch):
    # a preset's config reaches the loader and the RGB model: one tiny training run
    from anil_fast.config import scenario_config
    from anil_fast.training.run import train
    root = write_cifar100(no_data / "c", per_class=(3, 1))
    config = scenario_config("fc100-5w1s", data_root=str(root), meta_steps=2, meta_batch=2,
                             test_tasks=4, device="cpu", inner_steps=1)
    summary = train(config, no_data / "run", progress=False)
    assert summary["meta_steps"] == 2 and summary["evaluation"]["tasks"] == 4
    saved = json.loads((no_data / "run" / "config.json").read_text())
    assert saved["dataset"] == "fc100" and saved["image_size"] == 32


def test_mini_imagenet_csvs_as_spreadsheets_save_them(no_data):
    root = write_mini_imagenet(no_data / "mini")
    for name in ("train.csv", "val.csv", "test.csv"):
        text = (root / name).read_text().replace("\r\n", "\n")
        (root / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_benchmark("mini-imagenet", "test", 12, root=root).num_classes == 20


def test_mini_imagenet_splits_that_share_images_or_classes_are_refused(no_data):
    root = write_mini_imagenet(no_data / "mini")
    train_rows = (root / "train.csv").read_text().splitlines()
    test_rows = (root / "test.csv").read_text().splitlines()
    # a test row pointing at a training image
    leaked = train_rows[1].split(",")[0]
    (root / "test.csv").write_text("\n".join([test_rows[0], f"{leaked},{test_rows[1].split(',')[1]}",
                                              *test_rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=f"{leaked}.*train.csv and test.csv"):
        load_benchmark("mini-imagenet", "test", 12, root=root)
    # a test class that is a training class
    train_class = train_rows[1].split(",")[1]
    (root / "test.csv").write_text("\n".join([*test_rows, f"{test_rows[1].split(',')[0]}x,{train_class}"]) + "\n")
    with pytest.raises(ValueError, match=f"{train_class}.*train.csv and test.csv"):
        load_benchmark("mini-imagenet", "train", 12, root=root)
    # a file outside images/
    (root / "test.csv").write_text("\n".join([*test_rows, f"../../etc/passwd,{test_rows[1].split(',')[1]}"]) + "\n")
    with pytest.raises(ValueError, match="not a file name inside"):
        load_benchmark("mini-imagenet", "test", 12, root=root)


def test_cifar_with_float_pixels_or_labels_out_of_range_is_refused(no_data):
    root = write_cifar100(no_data / "c")
    train = root / "cifar-100-python" / "train"
    with open(train, "rb") as f:
        part = pickle.load(f)
    floats = dict(part, data=part["data"].astype(np.float32) / 255)
    with open(train, "wb") as f:
        pickle.dump(floats, f, protocol=2)
    with pytest.raises(ValueError, match="uint8.*float32"):
        load_benchmark("cifar-fs", "test", root=root, download=False)
    bad = dict(part, fine_labels=[*part["fine_labels"][:-1], 100])
    with open(train, "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match=r"fine labels must lie in 0\.\.99, found 0\.\.100"):
        load_benchmark("cifar-fs", "test", root=root, download=False)
