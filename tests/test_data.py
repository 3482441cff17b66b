import os
import time
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anil_fast.data import Omniglot, TaskSampler, load_split, standard_characters
from anil_fast.data.omniglot import load_npz, load_zip


def test_counts_and_pixels(background28, evaluation28, omniglot_dir):
    assert background28.images.shape == (964, 20, 1, 28, 28)
    assert evaluation28.images.shape == (659, 20, 1, 28, 28)
    assert background28.images.dtype == torch.float32
    assert len(background28.alphabets) == 964 and background28.alphabets[0] == "Arcadian"
    assert len(set(evaluation28.alphabets)) == 20
    assert background28.character_ids[0] == 1 and evaluation28.character_ids[0] == 965
    # area interpolation of the ink mask (ink = 1), resized once
    ink = torch.from_numpy(load_npz(omniglot_dir / "images_background.npz")[:3]).float()
    expected = F.interpolate(ink.reshape(-1, 1, 105, 105), size=(28, 28), mode="area")
    assert torch.equal(background28.images[:3].reshape(-1, 1, 28, 28), expected)
    assert 0.0 <= background28.images.min() and background28.images.max() <= 1.0


def test_original_size_is_unchanged(omniglot_dir):
    om = Omniglot("evaluation", 105, root=omniglot_dir, download=False)
    with np.load(omniglot_dir / "images_evaluation.npz") as arrays:
        paper = arrays["images"]
    assert om.images.shape == (659, 20, 1, 105, 105)
    assert torch.equal(om.images[:, :, 0], torch.from_numpy(~paper).float())


def test_disk_cache(omniglot_dir, isolated_cache):
    first = time.perf_counter()
    a = Omniglot("evaluation", 31, root=omniglot_dir, download=False)
    first = time.perf_counter() - first
    files = list((isolated_cache / "omniglot" / "decoded").glob("evaluation_31_*.npy"))
    assert len(files) == 1
    second = time.perf_counter()
    b = Omniglot("evaluation", 31, root=omniglot_dir, download=False)
    second = time.perf_counter() - second
    assert torch.equal(a.images, b.images) and a.alphabets == b.alphabets
    assert second < 1.0, f"cached load took {second:.2f} s (first {first:.2f} s)"
    # a broken cache file is rebuilt, never trusted
    files[0].write_bytes(b"garbage")
    c = Omniglot("evaluation", 31, root=omniglot_dir, download=False)
    assert torch.equal(a.images, c.images)


def test_official_archive_pixel_for_pixel(small_archive, omniglot_dir):
    ink, ids, alphabets = load_zip(small_archive)
    assert ink.shape == (136, 20, 105, 105) and len(set(alphabets)) == 5
    reference = load_npz(omniglot_dir / "images_background.npz")
    assert np.array_equal(ink, reference[ids - 1])


def test_zip_folder_and_torchvision_layouts(small_archive, omniglot_dir, tmp_path, isolated_cache):
    reference = torch.from_numpy(load_npz(omniglot_dir / "images_background.npz")).float()
    # official zip under its official name
    zroot = tmp_path / "zip"
    zroot.mkdir()
    with zipfile.ZipFile(small_archive) as src, \
            zipfile.ZipFile(zroot / "images_background.zip", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace("images_background_small1", "images_background"),
                         src.read(info))
    with pytest.raises(ValueError, match="25 whole alphabets"):  # 5 of the 30 alphabets
        Omniglot("background", 105, root=zroot, download=False)
    om = Omniglot("background", 105, root=zroot, download=False, partial=True)
    assert om.source.name == "images_background.zip"
    assert torch.equal(om.images[:, :, 0], reference[om.character_ids - 1])
    # unpacked folder in torchvision's omniglot-py/ layout
    froot = tmp_path / "folder"
    with zipfile.ZipFile(zroot / "images_background.zip") as z:
        z.extractall(froot / "omniglot-py")
    om2 = Omniglot("background", 28, root=froot, download=False, partial=True)
    assert om2.source == froot / "omniglot-py" / "images_background"
    assert len(om2) == 136 and om2.alphabets == om.alphabets


def test_missing_data_names_every_path(tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setenv("ANIL_FAST_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        Omniglot("background", 28, root=tmp_path / "root", download=False)
    message = str(info.value)
    for part in (str(tmp_path / "root"), str(tmp_path / "nowhere" / "omniglot"),
                 str(isolated_cache / "omniglot"), "images_background.npz", "ANIL_FAST_DATA"):
        assert part in message


def test_corrupt_files_are_named(omniglot_dir, tmp_path, isolated_cache):
    data = (omniglot_dir / "images_evaluation.npz").read_bytes()
    (tmp_path / "images_evaluation.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="images_evaluation.npz"):
        Omniglot("evaluation", 28, root=tmp_path, download=False)
    bad_zip = tmp_path / "z"
    bad_zip.mkdir()
    (bad_zip / "images_background.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="images_background.zip"):
        Omniglot("background", 28, root=bad_zip, download=False)


@pytest.mark.parametrize("kwargs, word", [
    (dict(split="train"), "split"), (dict(split="background", image_size=7), "image_size"),
    (dict(split="background", image_size=106), "image_size")])
def test_bad_dataset_arguments(kwargs, word, omniglot_dir):
    with pytest.raises(ValueError, match=word):
        Omniglot(root=omniglot_dir, download=False, **kwargs)


def test_standard_protocol_split():
    train, val, test = (standard_characters(s, 100) for s in ("train", "validation", "test"))
    assert len(standard_characters("train")) == 1200 and len(test) == 423
    assert len(train) == 1100 and len(val) == 100
    all_ids = torch.cat([train, val, test])
    assert len(set(all_ids.tolist())) == 1623  # disjoint and complete
    assert torch.equal(standard_characters("test"), test)  # fixed seed


def test_load_split(background28, omniglot_dir):
    images = load_split("standard", "test", 28, omniglot_dir, download=False)
    assert images.shape == (423, 20, 1, 28, 28)
    seed_train = load_split("seed", "train", 28, omniglot_dir, download=False)
    assert torch.equal(seed_train, background28.images)
    with pytest.raises(ValueError, match="protocol"):
        load_split("other", "train")
    with pytest.raises(ValueError, match="validation"):
        load_split("seed", "validation")


def _class_images(images, rotations):
    return torch.cat([images.rot90(k, (-2, -1)) for k in range(4)]) if rotations else images


@pytest.mark.parametrize("rotations", [False, True])
def test_sampler_invariants(synthetic_characters, rotations):
    ways, shots, queries, tasks = 7, 3, 4, 6
    sampler = TaskSampler(synthetic_characters, ways, shots, queries, tasks, rotations=rotations,
                          seed=3)
    batch = sampler.sample()
    assert batch.support_x.shape == (tasks, ways * shots, 1, 28, 28)
    assert batch.query_x.shape == (tasks, ways * queries, 1, 28, 28)
    assert batch.support_y.dtype == torch.int64
    idx = sampler.draw_indices(tasks)
    batch = sampler.materialise(idx)
    classes = idx.rotations * 964 + idx.characters
    bank = _class_images(synthetic_characters, rotations)
    for t in range(tasks):
        assert len(set(classes[t].tolist())) == ways  # distinct classes
        for w in range(ways):
            draws = idx.drawings[t, w].tolist()
            assert len(set(draws)) == shots + queries  # support and query disjoint
            support = batch.support_x[t][batch.support_y[t] == w]
            query = batch.query_x[t][batch.query_y[t] == w]
            assert torch.equal(support, bank[classes[t, w], draws[:shots]])
            assert torch.equal(query, bank[classes[t, w], draws[shots:]])
    assert sorted(batch.support_y[0].unique().tolist()) == list(range(ways))
    if rotations:
        assert idx.rotations.unique().numel() > 1


def test_sampler_labels_are_randomly_assigned(synthetic_characters):
    sampler = TaskSampler(synthetic_characters, 5, 1, 1, 200, rotations=False, seed=0)
    idx = sampler.draw_indices(200)
    # label 0's character is not always the smallest character id of its task
    smallest = (idx.characters[:, 0] == idx.characters.min(1).values).float().mean()
    assert 0.05 < smallest < 0.5


def test_sampler_determinism_and_state(synthetic_characters):
    a = TaskSampler(synthetic_characters, 5, 1, 5, 4, seed=11)
    b = TaskSampler(synthetic_characters, 5, 1, 5, 4, seed=11)
    c = TaskSampler(synthetic_characters, 5, 1, 5, 4, seed=12)
    xa, xb, xc = a.sample(), b.sample(), c.sample()
    assert torch.equal(xa.support_x, xb.support_x) and torch.equal(xa.query_x, xb.query_x)
    assert not torch.equal(xa.support_x, xc.support_x)
    state = a.state_dict()
    after = a.sample()
    a.load_state_dict(state)
    assert torch.equal(a.sample().query_x, after.query_x)


def test_fixed_task_pool(synthetic_characters):
    sampler = TaskSampler(synthetic_characters, 5, 1, 5, 16, rotations=False, seed=0,
                          num_tasks=40)
    first_pass = [sampler.next_indices() for _ in range(3)]  # 48 tasks: the pool once, then 8
    chars = torch.cat([i.characters for i in first_pass])
    assert chars.shape[0] == 48
    pool = sampler.pool.characters
    assert torch.equal(chars[:40], pool)  # first pass walks the pool in order
    # every later task is one of the pool's
    later = torch.cat([sampler.next_indices().characters for _ in range(5)])
    pool_rows = {tuple(r) for r in pool.tolist()}
    assert all(tuple(r) in pool_rows for r in later.tolist())


def test_sampling_speed(synthetic_characters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler = TaskSampler(synthetic_characters, 5, 1, 15, 32, rotations=True, seed=0)
        sampler.sample()
        start = time.perf_counter()
        for _ in range(50):
            sampler.sample()
        per_batch = (time.perf_counter() - start) / 50
    finally:
        torch.set_num_threads(threads)
    print(f"sampling 32 tasks of 5-way 1-shot 15-query at 28 px: {1e3 * per_batch:.2f} ms")
    assert per_batch < 0.05  # the 5 ms target is measured in benches; this only catches blowups


@pytest.mark.parametrize("kwargs, word", [
    (dict(ways=2000), "ways"), (dict(shots=10, queries=11), "shots"),
    (dict(ways=1), "ways"), (dict(meta_batch=0), "meta_batch")])
def test_bad_sampler_arguments(synthetic_characters, kwargs, word):
    args = dict(ways=5, shots=1, queries=5, meta_batch=4, rotations=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        TaskSampler(synthetic_characters, **args)


# -- untrusted sources: content-keyed, verified cache; incomplete splits named ------------------

def test_cache_is_keyed_on_content_not_size_and_mtime(omniglot_dir, tmp_path, isolated_cache):
    """A different npz with the same size and mtime (as cp -p or rsync -a leave it) is decoded
    anew, not served from the cache of the old one."""
    with np.load(omniglot_dir / "images_evaluation.npz") as arrays:
        images, labels = arrays["images"], arrays["labels"]
    path = tmp_path / "images_evaluation.npz"
    np.savez(path, images=images, labels=labels)  # uncompressed: the size depends on shapes only
    first = Omniglot("evaluation", 20, root=tmp_path, download=False)
    stat = path.stat()
    np.savez(path, images=images[::-1].copy(), labels=labels)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = Omniglot("evaluation", 20, root=tmp_path, download=False)
    assert torch.equal(second.images, first.images.flip(0))


def test_changed_png_in_a_folder_is_not_served_stale(small_archive, tmp_path, isolated_cache):
    folder = tmp_path / "data" / "images_background"
    folder.parent.mkdir()
    with zipfile.ZipFile(small_archive) as z:
        z.extractall(tmp_path / "unpacked")
    (tmp_path / "unpacked" / "images_background_small1").rename(folder)
    first = Omniglot("background", 28, root=folder.parent, download=False, partial=True)
    pngs = sorted(folder.rglob("*.png"))
    a, b = pngs[0], pngs[-1]  # swap two drawings of different characters
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    second = Omniglot("background", 28, root=folder.parent, download=False, partial=True)
    assert torch.equal(second.images[0, 0], first.images[-1, -1])
    assert torch.equal(second.images[-1, -1], first.images[0, 0])
    b.unlink()  # a deleted drawing: an error naming the character, not the old images
    with pytest.raises(ValueError, match="drawings"):
        Omniglot("background", 28, root=folder.parent, download=False, partial=True)


def test_corrupted_cache_entry_is_rebuilt(omniglot_dir, isolated_cache):
    first = Omniglot("evaluation", 22, root=omniglot_dir, download=False)
    (entry,) = (isolated_cache / "omniglot" / "decoded").glob("evaluation_22_*.npy")
    array = np.load(entry)
    array[:10] = np.nan  # a valid .npy with bad values: today served as NaN images
    np.save(entry, array)
    second = Omniglot("evaluation", 22, root=omniglot_dir, download=False)
    assert torch.equal(second.images, first.images)
    assert torch.isfinite(second.images).all()


def test_incomplete_official_data_is_named(small_archive, omniglot_dir, tmp_path, isolated_cache):
    # an official-layout zip that lacks one character folder
    zroot = tmp_path / "zip"
    zroot.mkdir()
    with zipfile.ZipFile(small_archive) as src, \
            zipfile.ZipFile(zroot / "images_background.zip", "w") as dst:
        for info in src.infolist():
            if "/Korean/character05/" not in info.filename:
                dst.writestr(info.filename, src.read(info))
    with pytest.raises(ValueError, match="Korean/character05"):
        Omniglot("background", 28, root=zroot, download=False, partial=True)
    # an npz of 100 characters offered as the background set
    with np.load(omniglot_dir / "images_background.npz") as arrays:
        np.savez(tmp_path / "images_background.npz", images=arrays["images"][:100],
                 labels=arrays["labels"][:100])
    with pytest.raises(ValueError, match="holds 100 characters; the background set has 964"):
        Omniglot("background", 28, root=tmp_path, download=False)
    # the evaluation set filed as the background set
    ev = tmp_path / "ev"
    with zipfile.ZipFile(small_archive) as z:
        z.extractall(ev)
    (ev / "images_background_small1").rename(ev / "images_evaluation")
    with pytest.raises(ValueError, match="outside the evaluation set"):
        Omniglot("evaluation", 28, root=ev, download=False, partial=True)


@pytest.mark.parametrize("images, rotations, error, word", [
    (torch.zeros(10, 20, 1, 28, 28, dtype=torch.uint8), False, TypeError, "floating-point"),
    (torch.zeros(10, 20, 1, 28, 30), True, ValueError, "square"),
])
def test_sampler_refuses_images_it_cannot_use(images, rotations, error, word):
    with pytest.raises(error, match=word):
        TaskSampler(images, 5, 1, 5, 4, rotations=rotations)
    TaskSampler(images.float(), 5, 1, 5, 4, rotations=False)  # fine without rotations, as floats


def test_large_pools_draw_in_chunks_and_absurd_ones_are_refused(synthetic_characters, monkeypatch):
    import anil_fast.data.tasks as tasks_module
    from anil_fast.env import physical_memory_bytes
    small = TaskSampler(synthetic_characters, 5, 1, 2, 4, seed=3, num_tasks=50)
    monkeypatch.setattr(tasks_module, "DRAW_CHUNK", 16)  # 50 tasks in chunks of 16
    chunked = TaskSampler(synthetic_characters, 5, 1, 2, 4, seed=3, num_tasks=50)
    assert chunked.pool.drawings.shape == small.pool.drawings.shape == (50, 5, 3)
    assert torch.equal(chunked.pool.characters[:16], small.pool.characters[:16])  # chunk 1 as before
    assert (chunked.pool.characters < 964).all() and (chunked.pool.drawings < 20).all()
    # each task still has distinct classes and distinct drawings
    assert all(len(set(row.tolist())) == 5 for row in chunked.pool.characters)
    assert all(len(set(row.tolist())) == 3 for row in chunked.pool.drawings.flatten(0, 1))
    assert physical_memory_bytes() is not None  # the limit exists on this machine
    with pytest.raises(ValueError, match="pool of 1,000,000,000 tasks.*limit"):
        TaskSampler(synthetic_characters, 5, 1, 2, 4, num_tasks=1_000_000_000)


def test_absurd_counts_and_sizes_are_refused_before_loading(monkeypatch):
    from anil_fast.runs import build
    from anil_fast.evaluation import evaluate_checkpoint
    from anil_fast.config import scenario_config
    from anil_fast.runs.settings import resolve
    monkeypatch.setattr(build, "split_images", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    for overrides, word in (({"tasks": 10**9}, "tasks"), ({"test_tasks": 10**9}, "test_tasks"),
                            ({"image_size": 2048}, "image_size"),
                            ({"val_tasks": 10**9, "protocol": "standard", "validation": 5}, "val_tasks")):
        with pytest.raises(ValueError, match=f"{word}.*1,000,000|{word}.*1024"):
            resolve(scenario_config("s2", **overrides))
    with pytest.raises(ValueError, match="tasks must be an int in 1..1,000,000"):
        evaluate_checkpoint("nowhere", tasks=10**9)
