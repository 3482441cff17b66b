"""Run folders and checkpoints a user points us at: no code execution, no clobbering, one run
per folder, clear errors for bad settings and faults (disk full, torn files)."""
import errno
import json
import os

import pytest
import torch

from anil_fast.cli import main
from anil_fast.runs.folder import RunFolder, load_checkpoint
from anil_fast.config import scenario_config
from anil_fast.evaluation import evaluate_checkpoint
from anil_fast.training.run import TrainingDiverged, train

TINY = ["--image-size", "28", "--meta-batch", "2", "--queries", "2", "--test-tasks", "4",
        "--inner-steps", "1", "--checkpoint-every", "2", "--no-progress", "--endless"]


pytestmark = pytest.mark.usefixtures("offline")  # never a download try (conftest)


needs_data = pytest.mark.usefixtures("omniglot_dir")


def tiny(**overrides):
    values = dict(image_size=28, meta_batch=2, queries=2, test_tasks=4, inner_steps=1,
                  meta_steps=4, checkpoint_every=2, tasks=None, device="cpu")
    values.update(overrides)
    return scenario_config("s2", **values)


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, omniglot_dir):
    """A finished 4-step run (read-only use: tests copy it when they change it)."""
    with pytest.MonkeyPatch.context() as patch:  # module scope: no function-scoped monkeypatch
        patch.setenv("ANIL_FAST_OFFLINE", "1")
        out = tmp_path_factory.mktemp("finished") / "run"
        train(tiny(), out, progress=False)
    return out


def copy_run(src, dst):
    dst.mkdir(parents=True)
    for name, data in snapshot(src).items():
        (dst / name).write_bytes(data)
    return dst


# -- 1. checkpoints load without unpickling code ------------------------------------------------

class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = copy_run(finished_run, tmp_path / "evil")
    ckpt = torch.load(evil / "checkpoint.pt", weights_only=True)
    ckpt["notes"] = _RunsACommand(marker)
    torch.save(ckpt, evil / "checkpoint.pt")
    code, out = run_cli(capsys, "eval", "--checkpoint", str(evil), "--tasks", "4")
    assert code == 2 and "unreadable" in out
    assert "posix.system" in out and "Weights only load failed" not in out  # the reason, not torch's advice
    code, out = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "6", *TINY,
                        "--out", str(evil), "--resume")
    assert code == 2 and "unreadable" in out
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_keys_and_format_are_checked(finished_run, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint(finished_run)["model"], plain)
    code, out = run_cli(capsys, "eval", "--checkpoint", str(plain))
    assert code == 2 and "not an anil-fast checkpoint" in out and "plain state_dict" in out
    ckpt = load_checkpoint(finished_run)
    ckpt["format"] = 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_format_1_checkpoints_still_load(finished_run, tmp_path):
    # format 1 kept the model and Adam under "anil"; the loader reads it as format 2
    ckpt = load_checkpoint(finished_run)
    old = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    old["format"] = 1
    old["anil"] = {"body": {k[5:]: v for k, v in ckpt["model"].items() if k.startswith("body.")},
                   "head": {k[5:]: v for k, v in ckpt["model"].items() if k.startswith("head.")},
                   "optimizer": ckpt["optimizer"]["optimizer"], "outer_steps": ckpt["optimizer"]["steps"]}
    torch.save(old, tmp_path / "v1.pt")
    upgraded = load_checkpoint(tmp_path / "v1.pt")
    assert upgraded["format"] == 2 and upgraded["optimizer"]["steps"] == ckpt["optimizer"]["steps"]
    assert list(upgraded["model"]) == list(ckpt["model"])
    assert all(torch.equal(upgraded["model"][k], v) for k, v in ckpt["model"].items())
    del old["anil"]["outer_steps"]
    torch.save(old, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="format 1"):
        load_checkpoint(tmp_path / "broken.pt")


# -- 2. a folder that holds a run is not started over by accident -------------------------------

def test_a_finished_run_is_not_overwritten(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                            "--out", str(out))
    assert code == 2 and "already holds a run" in message and "--overwrite" in message
    assert snapshot(out) == before  # nothing touched
    code, _ = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                      "--out", str(out), "--overwrite")
    assert code == 0
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and load_checkpoint(out)["step"] == 2


# -- 3. one run per folder ----------------------------------------------------------------------

@needs_data
def test_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"\0" * 100)  # left by a kill -9
    with RunFolder(out).locked():
        code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                                "--out", str(out))
    assert code == 2 and f"PID {os.getpid()}" in message and "in use" in message
    assert not (out / "checkpoint.pt").exists()
    code, _ = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                      "--out", str(out))
    assert code == 0  # the lock is released with its holder
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


# -- 4. resume past the end ---------------------------------------------------------------------

def test_resume_past_the_end_is_an_error(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(ValueError, match="step 4, past the 2 meta-steps"):
        train(tiny(meta_steps=2), out, resume=True, progress=False)
    assert snapshot(out) == before


# -- 7. clear errors instead of tracebacks ------------------------------------------------------

def test_out_that_cannot_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, word in ((a_file, "is a file"), (a_file / "run", "cannot be created")):
        code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                                "--out", str(out))
        assert code == 2 and word in message and str(out) in message


class FullDisk:
    """A file whose writes fail as on a full disk after `room` bytes (the real errno)."""
    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@needs_data
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    # torch.save itself runs (it turns a failed write into "unexpected pos"); the disk fills
    # during the second checkpoint
    import anil_fast.env as env
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        f = real_fdopen(fd, *args, **kwargs)
        if name.startswith(".checkpoint.pt."):
            opened.append(1)
        return FullDisk(f, 4096) if len(opened) == 2 else f
    monkeypatch.setattr(env.os, "fdopen", fdopen)
    out = tmp_path / "run"
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "6", *TINY,
                            "--out", str(out))
    assert code == 2 and "disk is full" in message and "previous checkpoint.pt" in message, message
    assert "Traceback" not in message
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(env.os, "fdopen", real_fdopen)
    assert load_checkpoint(out)["step"] == 2


@pytest.mark.parametrize("args, word", [
    (["--seed", str(2**64)], "seed"),
    (["--outer-lr", "1e39"], "outer_lr"),
    (["--outer-lr", "1e38"], "outer_lr"),
    (["--inner-lr", "-0.4"], "inner_lr"),
    (["--eval-inner-steps", "-1"], "eval_inner_steps"),
    (["--ways", "700"], "ways"),  # 964 training characters, 659 test characters
])
@needs_data
def test_bad_settings_are_refused_before_training(args, word, tmp_path, capsys):
    out = tmp_path / "run"
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                            *args, "--out", str(out))
    assert code == 2 and word in message, message
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_eval_task_count_must_be_positive(finished_run, capsys):
    code, message = run_cli(capsys, "eval", "--checkpoint", str(finished_run), "--tasks", "0")
    assert code == 2 and "tasks" in message


def test_resume_skips_a_torn_metrics_line(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.6')  # a kill mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl:5"):
        train(tiny(meta_steps=6), out, resume=True, progress=False)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- 8. divergence: a good last checkpoint and advice that works ---------------------------------

@needs_data
def test_huge_weights_are_never_checkpointed_and_resume_may_lower_the_lr(tmp_path, monkeypatch):
    from anil_fast.training.optim import MetaOptimizer
    original, calls = MetaOptimizer.step, []

    def blows_up(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # |b| = 1e30 while the loss stays finite (equal logit shift)
            with torch.no_grad():
                self.anil.head.bias.fill_(1e30)
        return out
    monkeypatch.setattr(MetaOptimizer, "step", blows_up)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 2") as info:
        train(tiny(meta_steps=6), out, progress=False)
    assert "--resume" in str(info.value)
    kept = load_checkpoint(out)
    assert kept["step"] == 2
    assert all(v.abs().max() < 1e6 for k, v in kept["model"].items() if k.startswith("head."))
    monkeypatch.setattr(MetaOptimizer, "step", original)
    with pytest.warns(UserWarning, match="from step 2 with changed settings: outer_lr 0.001 -> 0.0005"):
        summary = train(tiny(meta_steps=6, outer_lr=0.0005), out, resume=True, progress=False)
    assert summary["resumes_with_changes"] == [{"step": 2, "changes": {"outer_lr": [0.001, 0.0005]}}]
    assert json.loads((out / "results.json").read_text())["resumes_with_changes"][0]["step"] == 2
    assert load_checkpoint(out)["history"] == summary["resumes_with_changes"]


# -- 10. no side effects on the caller's process -------------------------------------------------

@needs_data
def test_train_and_evaluate_leave_the_global_rng_alone(finished_run, tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    train(tiny(meta_steps=2), tmp_path / "run", progress=False)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(1234)
    evaluate_checkpoint(finished_run, tasks=4, device="cpu", progress=False)
    assert torch.equal(torch.rand(4), expected)


# -- 11. bf16 on a CPU without native bf16 --------------------------------------------------------

@needs_data
def test_bf16_without_native_support_trains_in_fp32_and_says_so(tmp_path, monkeypatch):
    import anil_fast.runs.settings as settings
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        summary = train(tiny(meta_steps=2, precision="bf16"), tmp_path / "run", progress=False)
    assert summary["precision"] == "fp32"
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: True)
    summary = train(tiny(meta_steps=2, precision="bf16"), tmp_path / "run2", progress=False)
    assert summary["precision"] == "bf16"


# -- never delete what a flag did not ask to delete; never follow a symlinked lock ---------------

@needs_data
def test_resume_without_a_checkpoint_names_what_is_there_and_deletes_nothing(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "copied")
    (out / "checkpoint.pt").unlink()  # copied without it, or renamed
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"no checkpoint\.pt to resume from.*results\.json"):
        train(tiny(), out, resume=True, progress=False)
    assert snapshot(out) == before
    code, text = run_cli(capsys, "train", "--scenario", "s2", "--image-size", "28",
                         "--meta-batch", "2", "--queries", "2", "--test-tasks", "4",
                         "--meta-steps", "4", "--device", "cpu", "--out", str(out), "--resume",
                         "--no-progress")
    assert code == 2 and "--overwrite" in text and snapshot(out) == before


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        with RunFolder(out).locked():
            pass
    assert target.read_text() == "keep me"


# -- issue 19: the edges a careless or hostile user finds ---------------------------------------

@needs_data
def test_overwrite_deletes_only_files_anil_fast_wrote(finished_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own settings"}')  # the user's, not a run's
    (out / "notes.txt").write_text("keep")
    before = snapshot(out)
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                            "--out", str(out), "--overwrite")
    assert code == 2 and "config.json, which anil-fast did not write" in message
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before
    # a run's own files are recognised by their content and replaced
    run = copy_run(finished_run, tmp_path / "run")
    (run / "notes.txt").write_text("keep")
    code, _ = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                      "--out", str(run), "--overwrite")
    assert code == 0 and (run / "notes.txt").read_text() == "keep"
    assert load_checkpoint(run)["step"] == 2


def test_an_empty_out_and_unsupported_devices_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                            "--out", "")
    assert code == 2 and "--out must name a folder" in message and list(tmp_path.iterdir()) == []
    for device in ("mps", "meta", "cuda:7"):
        code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                                "--out", "run", "--device", device)
        assert code == 2 and f"device {device!r}" in message and "Traceback" not in message
        assert not (tmp_path / "run").exists()  # refused before the folder was made
    code, message = run_cli(capsys, "eval", "--checkpoint", "run", "--device", "mps")
    assert code == 2 and "'mps'" in message


@needs_data
def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(tiny(meta_steps=2), out, progress=False)
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.pt", "results.json", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


@needs_data
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from anil_fast.training.optim import MetaOptimizer
    original, calls = MetaOptimizer.step, []

    def interrupted_at_step_5(self, batch, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, batch, **kwargs)
    monkeypatch.setattr(MetaOptimizer, "step", interrupted_at_step_5)
    out = tmp_path / "run"
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "8", *TINY,
                            "--out", str(out))
    assert code == 130 and "Traceback" not in message
    assert "interrupted at step 4" in message and "step 4) is kept" in message and "--resume" in message
    monkeypatch.setattr(MetaOptimizer, "step", original)
    assert load_checkpoint(out)["step"] == 4
    code, _ = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "8", *TINY,
                      "--out", str(out), "--resume")
    assert code == 0 and load_checkpoint(out)["step"] == 8


@needs_data
def test_a_huge_loss_and_wild_batchnorm_statistics_stop_the_run(tmp_path, monkeypatch):
    # --inner-lr 1e30 gives finite but absurd losses (9.6e30): divergence, not a result
    with pytest.raises(TrainingDiverged, match="meta-loss became .*more than 10000"):
        train(tiny(meta_steps=4, inner_lr=1e30), tmp_path / "lr", progress=False)
    assert not (tmp_path / "lr" / "results.json").exists()
    from anil_fast.models.batchnorm import batchnorm_layers
    from anil_fast.training.optim import MetaOptimizer
    original, calls = MetaOptimizer.step, []

    def wild_statistics(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            batchnorm_layers(self.anil.body)[0].running_var.fill_(1e19)
        return out
    monkeypatch.setattr(MetaOptimizer, "step", wild_statistics)
    with pytest.raises(TrainingDiverged, match=r"running statistic reached [0-9.]+e\+1[89] .*step 4"):
        train(tiny(meta_steps=6), tmp_path / "bn", progress=False)
    assert load_checkpoint(tmp_path / "bn")["step"] == 2


@needs_data
def test_results_say_what_they_are(finished_run, tmp_path, capsys):
    from anil_fast.config import NO_VALIDATION_NOTE
    # validation asked for but never scheduled: said, not silently skipped
    from anil_fast.runs.settings import resolve
    config = resolve(scenario_config("std-5w1s", validation=5, val_every=0, val_every_s=None,
                                     meta_steps=2, meta_batch=2, test_tasks=4, device="cpu")).config
    assert NO_VALIDATION_NOTE in config.notes
    code, message = run_cli(capsys, "train", "--scenario", "s2", "--protocol", "standard",
                            "--validation", "5", "--val-every", "0", "--meta-steps", "1",
                            *TINY, "--out", str(tmp_path / "std"))
    assert code == 0 and "no validation runs" in message
    # eval says which weights it scored
    code, message = run_cli(capsys, "eval", "--checkpoint", str(finished_run), "--tasks", "4",
                            "--device", "cpu")
    assert code == 0 and "weights: last (step 4)" in message
    code, message = run_cli(capsys, "eval", "--checkpoint", str(finished_run), "--tasks", "4",
                            "--weights", "best")
    assert code == 2 and "no best.pt" in message


def test_compare_refuses_repeated_or_no_scenarios_before_training(tmp_path, capsys, monkeypatch):
    import anil_fast.experiments.compare as compare
    monkeypatch.setattr(compare, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    for names, word in (("s2,s2", "s2 named more than once"), ("", "at least one scenario"),
                        (" , ", "at least one scenario")):
        code, message = run_cli(capsys, "compare", "--scenarios", names, "--out", str(tmp_path / "c"))
        assert code == 2 and word in message, message


def test_reproduce_keeps_another_suites_report(tmp_path, capsys, monkeypatch):
    import anil_fast.experiments.reproduce as reproduce
    monkeypatch.setattr(reproduce, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    out = tmp_path / "rep"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps([{"suite": "paper", "preset": "std-5w1s"}]))
    code, message = run_cli(capsys, "reproduce", "--suite", "seed", "--smoke", "--out", str(out))
    assert code == 2 and "report of the paper suite" in message
    (out / "reproduce.json").write_text("my own notes")
    code, message = run_cli(capsys, "reproduce", "--suite", "seed", "--smoke", "--out", str(out))
    assert code == 2 and "not a report anil-fast wrote" in message


# -- a run replayed from its config.json (issue 22) ---------------------------------------------

@needs_data
def test_train_config_replays_a_run_bit_for_bit(finished_run, tmp_path, capsys):
    again = tmp_path / "again"
    code, _ = run_cli(capsys, "train", "--config", str(finished_run / "config.json"),
                      "--out", str(again), "--no-progress")
    assert code == 0
    first, second = load_checkpoint(finished_run), load_checkpoint(again)
    assert first["step"] == second["step"] == 4
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    losses = [[json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (finished_run, again)]
    assert losses[0] == losses[1]
    # the same settings; the notes may differ (the first run's "precision auto: ..." note
    # is not repeated where the replay asks for the precision it resolved to)
    settings = [{k: v for k, v in json.loads((run / "config.json").read_text()).items()
                 if k != "notes"} for run in (again, finished_run)]
    assert settings[0] == settings[1]
    # the flags on top of the file
    code, _ = run_cli(capsys, "train", "--config", str(finished_run / "config.json"),
                      "--meta-steps", "2", "--seed", "5", "--out", str(tmp_path / "other"), "--no-progress")
    recorded = json.loads((tmp_path / "other" / "config.json").read_text())
    assert code == 0 and recorded["meta_steps"] == 2 and recorded["seed"] == 5


def test_train_config_names_unknown_keys_and_wrong_types(finished_run, tmp_path, capsys):
    settings = json.loads((finished_run / "config.json").read_text())
    for change, word in (({"wayz": 5}, "unknown setting(s) wayz"),
                         ({"ways": "5"}, "ways must be int, got '5'"),
                         ({"first_order": "yes"}, "first_order must be bool"),
                         ({"inner_lr": None}, "inner_lr must be float"),
                         ({"ways": True}, "ways must be int")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**settings, **change}))
        code, message = run_cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "r"))
        assert code == 2 and word in message, message
    path.write_text("[1, 2]")
    code, message = run_cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "r"))
    assert code == 2 and "JSON object" in message
    code, message = run_cli(capsys, "train", "--config", str(finished_run / "config.json"),
                            "--scenario", "s1", "--out", str(tmp_path / "r"))
    assert code == 2 and "exclude each other" in message
    assert not (tmp_path / "r").exists()


@needs_data
def test_precision_auto_picks_bf16_only_where_it_is_native(tmp_path, monkeypatch, capsys):
    import anil_fast.runs.settings as settings
    assert scenario_config("s2").precision == "auto"  # the default
    for native, expected, flag in ((False, "fp32", ["--precision", "auto"]), (True, "bf16", [])):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)
        out = tmp_path / expected
        code, text = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "1", *TINY,
                             *flag, "--out", str(out))
        assert code == 0 and f"precision auto: {expected}" in text
        assert json.loads((out / "config.json").read_text())["precision"] == expected
        assert json.loads((out / "results.json").read_text())["precision"] == expected


@needs_data
@pytest.mark.parametrize("mode", ["joint", "support"])
def test_every_batchnorm_mode_trains_and_evaluates_from_the_cli(mode, tmp_path, capsys):
    out = tmp_path / mode
    code, text = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "2", *TINY,
                         "--bn-mode", mode, "--out", str(out))
    assert code == 0 and f"(BatchNorm: {mode})" in text
    assert json.loads((out / "results.json").read_text())["evaluation"]["bn_mode"] == mode
    code, text = run_cli(capsys, "eval", "--checkpoint", str(out), "--tasks", "4")
    assert code == 0 and f"(BatchNorm: {mode})" in text


@needs_data
def test_a_prototype_head_trains_evaluates_and_predicts_from_the_cli(tmp_path, capsys):
    out = tmp_path / "proto"
    code, text = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "3", *TINY,
                         "--head-init", "proto", "--out", str(out))
    assert code == 0, text
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["head_init"] == "proto" and "proto_scale" in ckpt["model"]
    assert ckpt["model"]["proto_scale"].item() != 1.0  # meta-learned
    code, text = run_cli(capsys, "eval", "--checkpoint", str(out), "--tasks", "4")
    assert code == 0 and "accuracy after adaptation" in text
    # resuming with another initial head is refused: it is another model
    code, text = run_cli(capsys, "train", "--scenario", "s2", "--meta-steps", "4", *TINY,
                         "--out", str(out), "--resume")
    assert code == 2 and "head_init" in text


@needs_data
def test_a_run_from_before_the_new_settings_still_resumes_and_evaluates(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "old")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("head_init", "weights_file"):  # settings this version added
        ckpt["config"].pop(key)
    torch.save(ckpt, out / "checkpoint.pt")
    summary = train(tiny(meta_steps=6), out, resume=True, progress=False)
    assert summary["meta_steps"] == 6
    assert evaluate_checkpoint(out, tasks=4, device="cpu", progress=False)["tasks"] == 4
