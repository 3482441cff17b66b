"""Few-shot data beyond Omniglot: the resident FewShotImages type, TaskSampler on classes of
different sizes and 8-bit storage, and bring-your-own data (class folders, tensors, datasets)
with its content-keyed cache."""
import json
import os

import numpy as np
import pytest
import torch

from anil_fast.data import FewShotImages, TaskSampler, from_dataset, from_tensors, image_folder
from anil_fast.data.fewshot import folder_splits


def tagged(counts, size=8):
    """uint8 images whose channel 0 holds the class and channel 1 the example index."""
    images, labels = [], []
    for c, n in enumerate(counts):
        for e in range(n):
            x = torch.zeros(3, size, size, dtype=torch.uint8)
            x[0], x[1], x[2] = c, e, 255
            images.append(x)
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def test_sampler_draws_each_class_from_its_own_examples():
    counts = [3, 9, 4, 12, 5, 3, 7]
    images, labels = tagged(counts)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    data = from_tensors(images[perm], labels[perm])  # grouped again by label
    assert data.counts.tolist() == counts and data.pixels.dtype == torch.uint8
    sampler = TaskSampler(data, ways=4, shots=1, queries=2, meta_batch=50, seed=3)
    batch = sampler.sample()
    assert batch.support_x.dtype == torch.float32 and batch.support_x[..., 2, :, :].eq(1).all()
    classes = (batch.support_x[:, :, 0, 0, 0] * 255).round().long()  # [T, W*shots]
    for t in range(50):
        for j in range(4):
            cls = classes[t][batch.support_y[t] == j].unique()
            assert cls.numel() == 1
            q = batch.query_x[t][batch.query_y[t] == j]
            assert ((q[:, 0, 0, 0] * 255).round().long() == cls).all()  # same class
            examples = torch.cat([batch.support_x[t][batch.support_y[t] == j][:, 1, 0, 0],
                                  q[:, 1, 0, 0]])
            examples = (examples * 255).round().long()
            assert examples.unique().numel() == 3  # support and queries disjoint
            assert (examples < counts[int(cls)]).all()  # from this class's own examples
    # every example of a small class is reachable
    seen = set()
    for _ in range(20):
        b = sampler.sample()
        x = (torch.cat([b.support_x, b.query_x], 1)[:, :, :2, 0, 0] * 255).round().long()
        seen |= {tuple(v) for v in x.reshape(-1, 2).tolist() if v[0] == 0}
    assert seen == {(0, e) for e in range(3)}


def test_a_class_with_too_few_examples_is_named():
    images, labels = tagged([5, 2, 6])
    data = from_tensors(images, labels, class_names=["cat", "dog", "emu"])
    with pytest.raises(ValueError, match="class 1 \\('dog'\\) has only 2 images"):
        TaskSampler(data, ways=2, shots=1, queries=2, meta_batch=1)


def test_omniglot_shaped_tensors_sample_as_before():
    # a [classes, examples, C, H, W] tensor and the same data as FewShotImages: same tasks
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(30, 20, 1, 12, 12, generator=g)
    for rotations in (False, True):
        a = TaskSampler(grid, 5, 2, 3, 4, rotations=rotations, seed=7, num_tasks=10)
        b = TaskSampler(FewShotImages.from_grid(grid), 5, 2, 3, 4, rotations=rotations, seed=7,
                        num_tasks=10)
        for _ in range(3):
            x, y = a.sample(), b.sample()
            assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)


def test_fewshot_images_checks_its_input():
    with pytest.raises(ValueError, match="counts sum"):
        FewShotImages(torch.zeros(5, 1, 4, 4), torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="uint8"):
        FewShotImages(torch.zeros(4, 1, 4, 4, dtype=torch.int32), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="at least one"):
        FewShotImages(torch.zeros(4, 1, 4, 4), torch.tensor([4, 0]))
    with pytest.raises(TypeError, match="FewShotImages"):
        TaskSampler([1, 2], 2, 1, 1, 1)
    data = FewShotImages(torch.zeros(6, 3, 4, 6, dtype=torch.uint8), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="square"):
        TaskSampler(data, 2, 1, 1, 1, rotations=True)


def test_from_dataset_takes_a_torchvision_dataset():
    import torchvision
    fake = torchvision.datasets.FakeData(size=30, image_size=(3, 20, 24), num_classes=3,
                                         random_offset=5)
    data = from_dataset(fake, image_size=16)
    assert data.pixels.shape == (30, 3, 16, 16) and data.pixels.dtype == torch.uint8
    assert int(data.counts.sum()) == 30 and data.num_classes == 3
    gray = from_dataset(fake, image_size=16, channels=1)
    assert gray.pixels.shape[1] == 1
    with pytest.raises(TypeError, match="dataset\\[0\\]"):
        from_dataset([("not an image", 0)])


# -- a folder of class folders -------------------------------------------------------------------

def make_folder(root, classes=20, per_class=(4, 7), splits=False, seed=0):
    """Class folders of PNG and JPEG images of varied sizes and modes; each image's colour
    encodes its class. With splits: train/ val/ test/ folders of class folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        parent = root
        if splits:
            parent = root / ("train" if c < classes - 8 else "val" if c < classes - 4 else "test")
        folder = parent / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for e in range(per_class[c % len(per_class)]):
            size = (int(rng.integers(12, 30)), int(rng.integers(12, 30)))
            image = Image.new("RGB", size, (10 * c, 200, 50))
            if e % 3 == 2:
                image = image.convert("L")
            image.save(folder / f"{e}.{'png' if e % 2 else 'jpg'}")
    return root


def test_image_folder_splits_and_decodes(tmp_path, isolated_cache):
    root = make_folder(tmp_path / "data")
    splits = folder_splits(root)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [13, 3, 4]
    assert not set(splits["train"]) & set(splits["test"])
    assert folder_splits(root) == splits  # the same split every time
    train = image_folder(root, "train", image_size=16)
    assert train.pixels.shape[1:] == (3, 16, 16) and train.num_classes == 13
    assert train.class_names == [p.name for p in splits["train"]]
    red = train.pixels[:, 0, 8, 8].float()
    first = int(train.class_names[0].split("_")[1])
    assert abs(red[0] - 10 * first) <= 3  # the class's colour, through resize and JPEG
    gray = image_folder(root, "test", image_size=16, channels=1)
    assert gray.pixels.shape[1] == 1
    # split folders, and a split file
    other = make_folder(tmp_path / "split", splits=True)
    assert image_folder(other, "validation", 16).num_classes == 4
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["class_00", "class_05"], "test": ["class_07"]}))
    assert image_folder(root, "train", 16, split_file=split_file).class_names == ["class_00", "class_05"]
    with pytest.raises(ValueError, match="no 'validation' split"):
        image_folder(root, "validation", 16, split_file=split_file)
    split_file.write_text(json.dumps({"train": ["nope"]}))
    with pytest.raises(ValueError, match="'nope'"):
        image_folder(root, "train", 16, split_file=split_file)


def test_image_folder_cache_is_keyed_on_the_files(tmp_path, isolated_cache, monkeypatch):
    from PIL import Image
    root = make_folder(tmp_path / "data", classes=6)
    first = image_folder(root, "train", 16)
    # served from the cache: no image is opened
    import PIL.Image
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    assert torch.equal(image_folder(root, "train", 16).pixels, first.pixels)
    monkeypatch.setattr(PIL.Image, "open", real_open)
    # a changed image is never served stale
    victim = sorted((root / first.class_names[0]).iterdir())[0]
    Image.new("RGB", (20, 20), (255, 255, 255)).save(victim, format="PNG" if victim.suffix == ".png" else "JPEG")
    os.utime(victim, ns=(1, 1))
    changed = image_folder(root, "train", 16)
    assert not torch.equal(changed.pixels, first.pixels)
    assert changed.pixels[0].float().mean() > 240
    # a tampered cache entry is rebuilt, not trusted
    entry = next((isolated_cache / "decoded").glob("folder_train_16_3_*.npy"))
    array = np.load(entry)
    array[0] = 0
    np.save(entry, array)
    assert torch.equal(image_folder(root, "train", 16).pixels, changed.pixels)


def test_bad_folders_are_named(tmp_path, isolated_cache):
    root = make_folder(tmp_path / "data", classes=5)
    (root / "class_01" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        for split in ("train", "validation", "test"):
            image_folder(root, split, 16)
    with pytest.raises(ValueError, match="not a folder"):
        image_folder(tmp_path / "missing", "train", 16)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least 3"):
        image_folder(tmp_path / "empty", "train", 16)
    # 5 classes split 64/16/20: one test class; more ways than that names the split
    from anil_fast.runs.build import task_sampler
    from anil_fast.config import scenario_config
    (root / "class_01" / "broken.png").unlink()
    from anil_fast.runs.settings import resolve
    config = resolve(scenario_config("s2", data=str(root), image_size=16, ways=2, queries=2)).config
    with pytest.raises(ValueError, match=r"the test split of .*data: ways \(2\) is larger than the 1 classes"):
        task_sampler(config, "test", "cpu")


def test_train_and_evaluate_on_a_folder_from_the_cli(tmp_path, isolated_cache):
    from anil_fast.cli import main
    root = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "--scenario", "s2", "--data", str(root), "--image-size", "16",
                 "--ways", "3", "--shots", "1", "--queries", "2", "--meta-steps", "3",
                 "--meta-batch", "2", "--test-tasks", "4", "--device", "cpu", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"]["tasks"] == 4
    assert json.loads((out / "config.json").read_text())["dataset"] == "folder"
    png = tmp_path / "tasks.png"
    assert main(["show-tasks", "--data", str(root), "--image-size", "16", "--ways", "3",
                 "--queries", "2", "--split", "validation", "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_docs_snippet_for_your_own_data(tmp_path, isolated_cache, monkeypatch):
    # the docs' "Your own data" code, run as written on a generated folder
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "own-data.md").read_text()
    start = page.index("# Your own data")
    code = page[page.index("```python", start) + 9:page.index("```", page.index("```python", start) + 9)]
    make_folder(tmp_path / "my_data")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "own-data.md", "exec"), namespace)
    assert 0 <= namespace["result"]["accuracy_after"] <= 1


# -- hostile and careless input: images, splits, the cache -----------------------------------------

def _one_image_folder(root, write):
    """Three classes of three images each; write(path, class, example) writes each image."""
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for e in range(3):
            write(root / f"c{c}", c, e)
    return root


@pytest.mark.parametrize("kind", ["png16", "tiff16", "float01", "float255", "int32"])
def test_deep_images_are_scaled_not_clipped(tmp_path, isolated_cache, kind):
    # 16-bit, 32-bit and float images: Pillow's own convert("L") clips 16-bit values to 255 and
    # floats to 0/1; each class's level must come through as the same 8-bit value
    from PIL import Image
    levels = {0: 0.2, 1: 0.5, 2: 0.8}  # fraction of full scale

    def write(folder, c, e):
        fraction = levels[c]
        if kind in ("png16", "tiff16"):
            array = np.full((12, 12), round(fraction * 65535), dtype=np.uint16)
        elif kind == "int32":
            array = np.full((12, 12), round(fraction * 65535), dtype=np.int32)
        else:
            scale = 1.0 if kind == "float01" else 255.0
            array = np.full((12, 12), fraction * scale, dtype=np.float32)
        suffix = ".png" if kind == "png16" else ".tif"
        Image.fromarray(array).save(folder / f"{e}{suffix}")

    root = _one_image_folder(tmp_path / "data", write)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["c0", "c1", "c2"]}))
    data = image_folder(root, "train", 12, channels=1, split_file=split)
    got = [int(data.pixels[3 * c, 0, 6, 6]) for c in range(3)]
    assert got == [round(levels[c] * 255) for c in range(3)], got


def test_images_that_cannot_be_read_name_the_file(tmp_path, isolated_cache, monkeypatch):
    import PIL.Image
    from PIL import Image
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["c0", "c1", "c2"]}))

    def negative(folder, c, e):
        Image.fromarray(np.full((8, 8), -1.0 if (c, e) == (1, 2) else 0.5, np.float32)).save(folder / f"{e}.tif")
    root = _one_image_folder(tmp_path / "neg", negative)
    with pytest.raises(ValueError, match=r"c1.2\.tif.*negative"):
        image_folder(root, "train", 8, channels=1, split_file=split)

    def large(folder, c, e):
        Image.new("L", (40, 40) if (c, e) == (2, 0) else (8, 8), 100).save(folder / f"{e}.png")
    root = _one_image_folder(tmp_path / "bomb", large)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)  # 40 x 40 > 2 x 500: a "bomb"
    with pytest.raises(ValueError, match=r"c2.0\.png.*Pillow's limit"):
        image_folder(root, "train", 8, split_file=split)


def test_too_many_pixels_are_refused_before_decoding(tmp_path, isolated_cache, monkeypatch):
    import anil_fast.env as env
    import PIL.Image
    root = make_folder(tmp_path / "data", classes=6)
    monkeypatch.setattr(env, "physical_memory_bytes", lambda: 2**20)  # a 1 MiB machine
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(ValueError, match=r"image-size.*|limit is half"):
        image_folder(root, "train", 2048)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="image_size"):  # and a cap on the setting itself
        from anil_fast.config import scenario_config
        from anil_fast.runs.settings import resolve
        resolve(scenario_config("s2", data=str(root), image_size=4096))


def test_split_files_are_checked(tmp_path, isolated_cache):
    root = make_folder(tmp_path / "data", classes=6)
    (tmp_path / "outside").mkdir()
    split = tmp_path / "split.json"
    cases = [
        ({"train": ["class_00", "class_01"], "test": ["class_01"]}, "'train' and in 'test'"),
        ({"train": ["class_00", "class_00"], "test": ["class_01"]}, "twice in 'train'"),
        ({"train": ["class_00"], "test": ["../outside"]}, "not a class folder inside"),
        ({"train": ["class_00"], "test": [str(tmp_path / "outside")]}, "not a class folder inside"),
        ({"train": ["class_00"], "test": ["."]}, "not a class folder inside"),
        ({"train": 7}, "'train' must be a list"),
        ({"train": ["class_00", 3]}, "'train' must be a list"),
    ]
    for listed, message in cases:
        split.write_text(json.dumps(listed))
        with pytest.raises(ValueError, match=message):
            image_folder(root, "train", 16, split_file=split)
    # a BOM, as some editors save JSON, is read
    split.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": ["class_00"]}).encode())
    assert image_folder(root, "train", 16, split_file=split).class_names == ["class_00"]


def test_split_folders_and_a_class_named_train(tmp_path, isolated_cache):
    from PIL import Image
    # a class folder named "train" holding images is a class, not a split folder
    root = make_folder(tmp_path / "data", classes=5)
    (root / "train").mkdir()
    for e in range(4):
        Image.new("RGB", (10, 10), (1, 2, 3)).save(root / "train" / f"{e}.png")
    names = [p.name for s in folder_splits(root).values() for p in s]
    assert "train" in names and len(names) == 6
    # split folders sharing a class are refused
    other = make_folder(tmp_path / "split", splits=True)
    (other / "test" / "class_00").mkdir()
    Image.new("RGB", (10, 10)).save(other / "test" / "class_00" / "0.png")
    with pytest.raises(ValueError, match="class_00.*train/.*test/"):
        folder_splits(other)


def test_a_class_name_that_is_not_utf8(tmp_path, isolated_cache):
    from PIL import Image
    root = make_folder(tmp_path / "data", classes=4)
    odd = os.fsencode(str(root)) + b"/caf\xe9"
    os.mkdir(odd)
    for e in range(4):
        Image.new("RGB", (10, 10), (9, 9, 9)).save(os.fsdecode(odd + f"/{e}.png".encode()))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["class_00", os.fsdecode(b"caf\xe9")]},
                                ensure_ascii=True))
    data = image_folder(root, "train", 16, split_file=split)
    assert data.num_classes == 2
    for s in ("train", "validation", "test"):  # the default split decodes it too
        image_folder(root, s, 16)


def test_a_same_size_edit_with_its_time_restored_is_not_served_stale(tmp_path, isolated_cache):
    # PPM files have a size fixed by their dimensions: an edit keeps the size, and the
    # modification time is put back as copy tools and `touch -r` do
    root = tmp_path / "data"

    def ppm(path, value):
        path.write_bytes(b"P6 8 8 255\n" + bytes([value]) * (8 * 8 * 3))
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for e in range(2):
            ppm(root / f"c{c}" / f"{e}.ppm", 40 * c + 10)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["c0", "c1", "c2"]}))
    first = image_folder(root, "train", 8, split_file=split)
    victim = root / "c0" / "0.ppm"
    before = victim.stat()
    ppm(victim, 250)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size and victim.stat().st_mtime_ns == before.st_mtime_ns
    again = image_folder(root, "train", 8, split_file=split)
    assert int(first.pixels[0, 0, 0, 0]) == 10 and int(again.pixels[0, 0, 0, 0]) == 250


def test_a_run_on_your_own_data_prints_no_omniglot_reference_and_evals_from_anywhere(
        tmp_path, isolated_cache, capsys, monkeypatch):
    from anil_fast.cli import main
    make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--scenario", "s2", "--data", "data", "--image-size", "16",  # relative
                 "--ways", "3", "--queries", "2", "--meta-steps", "2", "--meta-batch", "2",
                 "--test-tasks", "4", "--device", "cpu", "--out", "run", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "reference: none printed" in printed and "77.2" not in printed
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "data")  # recorded absolute
    # evaluated from another folder, where "data" names nothing (or something else)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tasks"] == 4


def test_show_tasks_into_a_folder_writes_the_file_it_names(tmp_path, isolated_cache, capsys):
    from anil_fast.cli import main
    root = make_folder(tmp_path / "data")
    folder = tmp_path / "pictures"
    folder.mkdir()
    capsys.readouterr()
    assert main(["show-tasks", "--data", str(root), "--image-size", "16", "--ways", "3",
                 "--queries", "2", "--out", str(folder)]) == 0
    written = folder / "tasks_train.png"
    assert f"wrote {written}" in capsys.readouterr().out and written.stat().st_size > 0
    assert not (tmp_path / "pictures.png").exists()
    assert main(["show-tasks", "--data", str(root), "--out", str(tmp_path / "x.jpg")]) == 2


def test_cache_clear_empties_the_decode_caches_only(tmp_path, isolated_cache, capsys):
    from anil_fast.cli import main
    root = make_folder(tmp_path / "data", classes=6)
    image_folder(root, "train", 16)
    (isolated_cache / "extensions").mkdir(parents=True)  # the C++ build: kept
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert f"{isolated_cache / 'decoded'}: 2 files" in capsys.readouterr().out  # .npy + .json
    assert main(["cache", "clear"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert not (isolated_cache / "decoded").exists() and (isolated_cache / "extensions").is_dir()
    assert image_folder(root, "train", 16).num_classes == 4  # decoded again
