"""What a run leaves in its folder and reads back: checkpoints written atomically (kills at any moment), exact
resume, going back, the folder lock, runs that never overwrite one another. Runs go through `main(argv)` in-process;
the kill tests run real subprocesses."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import eval as evaluation
import models
import run_folder
import settings
import train
from conftest import assert_same_steps, copy_run, rows, small

ROOT = Path(__file__).resolve().parent.parent


def test_resume_continues_exactly(tiny_agent, tmp_path):
    whole, split, extended = tmp_path / "whole", tmp_path / "split", tmp_path / "extended"
    train.main(small(tiny_agent, whole, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "3"))
    # an interrupted run: resume from its step-1 checkpoint (into another folder, to compare)
    train.main(["--resume", str(whole / "checkpoints" / "step-000001"), "--output-dir", str(split)])
    assert [row["step"] for row in rows(split)] == [2, 3]
    assert_same_steps(rows(whole), rows(split), [2, 3])
    # N steps, then M more: the same as N + M uninterrupted when the PRS schedule was planned for N + M
    train.main(small(tiny_agent, extended, "--steps", "1", "--schedule-steps", "3"))
    train.main(["--resume", str(extended), "--steps", "3"])
    assert [row["step"] for row in rows(extended)] == [0, 1, 2, 3]
    assert_same_steps(rows(whole), rows(extended), [2, 3])
    evaluation_at_the_first_end = {k for k in rows(extended)[1] if k.startswith("eval_")}
    assert_same_steps(rows(whole), rows(extended), [1], ignore=evaluation_at_the_first_end)
    weights = [(folder / "checkpoints" / "step-000003" / "model.safetensors").read_bytes()
               for folder in (whole, split, extended)]
    assert weights[0] == weights[1] == weights[2]
    # every step really updated (so the AdamW moments restored on resume were used), and they match too
    assert all(row["trained_on"] > 0 and row["skipped_updates"] == 0.0 for row in rows(whole)[1:])
    assert weights[0] != (whole / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()
    states = [torch.load(folder / "checkpoints" / "step-000003" / "optimizer.pt")["optimizer"]["state"]
              for folder in (whole, split, extended)]
    assert states[0] and all(state[0]["step"] == 3 * 2 for state in states)  # 2 mini-batches a step
    for other in states[1:]:
        assert all(torch.equal(states[0][key][name], other[key][name]) for key in states[0] for name in states[0][key])
    assert sorted(p.name for p in (whole / "checkpoints").glob("step-*")) == [f"step-00000{i}" for i in (1, 2, 3)]
    assert sorted(p.name for p in (split / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_a_resumed_run_keeps_every_sample_row_whatever_text_it_holds(tmp_path):
    # JSON leaves U+2028, U+2029 and U+0085 unescaped; a reader splitting lines at them drops the row (a retrieved
    # passage or a model's response can hold any of them).
    texts = ["line\u2028separator", "paragraph\u2029separator", "next\x85line", "form\x0cfeed", "plain"]
    rows = [{"step": 1 + i % 2, "response": text} for i, text in enumerate(texts)]
    (tmp_path / "samples.jsonl").write_text("".join(run_folder.jsonl_line(row) for row in rows), encoding="utf-8")
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")  # resumed from its step 2
    run_folder.Logger(tmp_path, settings.TrainArgs(), start_step=2).close()
    assert run_folder.read_jsonl(tmp_path / "samples.jsonl") == rows


def test_resume_from_an_output_folder_trains_further(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    train.main(["--resume", str(run), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    assert json.loads((run / "args.json").read_text())["steps"] == 3


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(vspo_run, tiny_agent, tmp_path,
                                                                       monkeypatch):
    run = copy_run(vspo_run, tmp_path / "run")
    before = (run / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died after the weights, before the rest

    monkeypatch.setattr(type(models.load_tokenizer(str(tiny_agent))), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", str(run), "--steps", "3"])
    monkeypatch.undo()
    latest = run_folder.find_checkpoint(str(run))
    assert latest.name == "step-000002" and (latest / "model.safetensors").read_bytes() == before
    assert not (run / "checkpoints" / "step-000003").exists()
    models.load_model(str(latest))
    train.main(["--resume", str(run), "--steps", "3"])  # and the run goes on from there
    assert run_folder.find_checkpoint(str(run)).name == "step-000003"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_is_on_disk_before_its_name_is(vspo_run, tmp_path, monkeypatch):
    # A rename is atomic against a kill, not against a power cut: each file's data, then the folder, must be flushed
    # before the name that promises them (the checkpoint's folder, then `latest`) is switched.
    run = copy_run(vspo_run, tmp_path / "run")
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    train.main(["--resume", str(run), "--steps", "3"])
    monkeypatch.undo()
    root = run / "checkpoints"
    renamed = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "step-000003"))
    tmp = Path(events[renamed][1])
    synced = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    written = {str(tmp / p.relative_to(root / "step-000003")) for p in (root / "step-000003").rglob("*")}
    assert written and written | {str(tmp)} <= synced, sorted(written - synced)
    switched = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "latest"))
    assert ("fsync", str(root)) in events[renamed:switched]  # the new name itself, before `latest` names it
    assert ("fsync", str(root / ".latest.tmp")) in events[renamed:switched]
    assert ("fsync", str(root)) in events[switched:]


def test_sigkill_at_any_moment_leaves_a_loadable_latest_checkpoint(tiny_agent, tmp_path):
    command = [sys.executable, "train.py", *small(tiny_agent, tmp_path, "--steps", "50", "--save-every", "1",
                                                  "--eval-size", "0")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "checkpoints" / "step-000002").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    latest = run_folder.find_checkpoint(str(tmp_path))
    models.load_model(str(latest))
    json.loads((latest / "trainer_state.json").read_text())
    torch.load(latest / "optimizer.pt", weights_only=False)


def test_an_earlier_run_is_never_overwritten_and_a_finished_one_says_so(vspo_run, tiny_agent):
    before = (vspo_run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"--output-dir {vspo_run} holds an earlier run: continue it with --resume"):
        train.main(small(tiny_agent, vspo_run, "--steps", "2"))
    with pytest.raises(SystemExit, match="the checkpoint is already at step 2: pass --steps above it"):
        train.main(["--resume", str(vspo_run)])
    assert (vspo_run / "metrics.jsonl").read_text() == before


def killed_before_its_first_save(run: Path) -> None:
    """What a kill after step 1 is logged, before its checkpoint is saved, leaves: the rows of steps 0 and 1, no
    checkpoint, and no row that records a save's time."""
    shutil.rmtree(run / "checkpoints")
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept = [{key: value for key, value in row.items() if key != "time_checkpoint"}
                for row in run_folder.read_jsonl(run / name) if row["step"] <= 1]
        (run / name).write_text("".join(run_folder.jsonl_line(row) for row in kept), encoding="utf-8")


def test_a_run_killed_before_its_first_checkpoint_is_started_again_in_its_folder(vspo_run, tiny_agent, tmp_path,
                                                                                 capsys):
    run = copy_run(vspo_run, tmp_path / "run")
    killed_before_its_first_save(run)
    with pytest.raises(SystemExit, match="stopped before its first checkpoint, so there is nothing to resume"):
        train.main(["--resume", str(run)])
    train.main(small(tiny_agent, run, "--steps", "2"))
    assert "holds a run that stopped before its first checkpoint; this run starts again" in capsys.readouterr().out
    assert [row["step"] for row in rows(run)] == [0, 1, 2]
    assert_same_steps(rows(vspo_run), rows(run), [0, 1, 2])  # the same run again, its logs not doubled
    assert (run / "samples.jsonl").read_text() == (vspo_run / "samples.jsonl").read_text()


def test_a_branch_killed_before_its_first_checkpoint_can_be_started_again(vspo_run, tmp_path, monkeypatch, capsys):
    source, branch = copy_run(vspo_run, tmp_path / "source"), tmp_path / "branch"
    command = ["--resume", str(source), "--output-dir", str(branch), "--steps", "3"]
    monkeypatch.setattr(run_folder, "save", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # step 3 of the branch is logged, then the process dies before its save
        train.main(command)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=f"run the command that started it again \\(--resume {re.escape(str(source))} "
                                         f"--output-dir {re.escape(str(branch))}"):
        train.main(["--resume", str(branch)])  # not "run it again without --resume": that would start from step 0
    train.main(command)  # the same command: the branch starts again, in place of its cut-short logs
    assert "stopped before its first checkpoint; this run (from" in capsys.readouterr().out
    assert [row["step"] for row in rows(branch)] == [3]
    assert run_folder.find_checkpoint(str(branch)).name == "step-000003"


def test_a_run_from_elsewhere_keeps_no_row_of_a_run_cut_short_in_its_folder(vspo_run, tiny_agent, tmp_path):
    source, other = copy_run(vspo_run, tmp_path / "source"), copy_run(vspo_run, tmp_path / "other")
    killed_before_its_first_save(other)  # another run, steps 0 and 1 logged, killed before its first checkpoint
    train.main(["--resume", str(source), "--output-dir", str(other), "--steps", "3"])
    assert [row["step"] for row in rows(other)] == [3]  # not that run's 0, 1, 2 under this one's 3
    assert {row["step"] for row in run_folder.read_jsonl(other / "samples.jsonl")} == {3}


def test_a_second_run_in_a_folder_a_run_is_training_in_stops_at_once_and_a_killed_run_leaves_no_lock(tiny_agent,
                                                                                                      tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(  # another process holding the folder as a training run does, until it is killed
        [sys.executable, "-c", "import pathlib, sys, time, run_folder\n"
         "with run_folder.exclusive(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)",
         str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"--output-dir {re.escape(str(run))}: in use by another run "
                                             f"\\(pid {holder.pid} on "):
            train.main(small(tiny_agent, run, "--steps", "1"))
        assert sorted(p.name for p in run.iterdir()) == ["run.pid"]  # nothing of the second run written
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    with run_folder.exclusive(run):  # the OS let the lock go with the process: nothing stale to clear
        assert f"pid {os.getpid()} " in (run / "run.pid").read_text()
    assert not (run / "run.pid").exists()


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
def test_a_folder_flag_that_names_a_file_is_a_clear_error(tmp_path, flag):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    flags = {"--output-dir": str(tmp_path / "run"), flag: str(file)}
    with pytest.raises(SystemExit, match=f"{flag} {re.escape(str(file))}"):
        train.main(["--model", models.TINY, *[x for pair in flags.items() for x in pair]])
    assert file.read_text() == "mine"


def test_an_evaluation_into_a_folder_another_is_writing_stops_before_writing(tmp_path):
    out = tmp_path / "out"
    with run_folder.exclusive(out, "--output"):  # what an evaluation (or a training run) writing there holds
        with pytest.raises(SystemExit, match=f"--output {re.escape(str(out))}: in use by another run \\(pid "):
            evaluation.main(["--model", models.TINY, "--output", str(out), "--limit", "2"])
        assert sorted(p.name for p in out.iterdir()) == ["run.pid"]  # no result of the second written


def test_eval_output_that_names_a_file_is_a_clear_error(tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    with pytest.raises(SystemExit, match=f"--output '{re.escape(str(file))}': a file, not a folder"):
        evaluation.main(["--model", models.TINY, "--output", str(file)])
    assert file.read_text() == "mine"


def test_going_back_to_an_earlier_checkpoint_moves_latest_there_at_once(tiny_agent, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(small(tiny_agent, run, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "2"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the new branch's step 2 is logged, then the process dies before its save

    monkeypatch.setattr(run_folder, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", str(run / "checkpoints" / "step-000001"), "--lr", "5e-4", "--steps", "3"])
    monkeypatch.undo()
    # `latest` names the checkpoint the branch started from, not the old step 2 whose log row was dropped
    assert run_folder.find_checkpoint(str(run)).name == "step-000001"
    assert [row["step"] for row in rows(run)] == [0, 1, 2]
    train.main(["--resume", str(run), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]
    assert run_folder.find_checkpoint(str(run)).name == "step-000003"


def test_resuming_into_a_folder_that_holds_another_run_is_refused(vspo_run, tmp_path):
    other, source = copy_run(vspo_run, tmp_path / "other"), copy_run(vspo_run, tmp_path / "source")
    before = (other / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"--output-dir {other} holds another run"):
        train.main(["--resume", str(source), "--output-dir", str(other), "--steps", "3"])
    assert (other / "metrics.jsonl").read_text() == before
    assert (other / "checkpoints" / "latest").read_text() == "step-000002"


def test_resuming_with_other_training_data_is_refused_naming_the_task(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]}\n')
    with pytest.raises(SystemExit, match=f"--task {questions}: not the training data"):
        train.main(["--resume", str(run), "--task", str(questions), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2]


class FakeWandb(types.ModuleType):
    """The wandb package at its network boundary: records what a run asks of it."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **options):
        self.inits.append(options)
        return types.SimpleNamespace(log=lambda metrics, step: self.logged.append(step), finish=lambda: None)


class FakeSummaryWriter:
    made = []

    def __init__(self, log_dir, purge_step=None):
        FakeSummaryWriter.made.append(purge_step)

    def add_scalar(self, name, value, step):
        pass

    def close(self):
        pass


def test_a_resumed_run_goes_on_in_its_wandb_run_and_tensorboard_drops_the_steps_it_redoes(vspo_run, tiny_agent,
                                                                                          tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.made.clear()
    run = copy_run(vspo_run, tmp_path / "run")
    train.main(["--resume", str(run), "--steps", "3", "--wandb"])
    train.main(["--resume", str(run / "checkpoints" / "step-000002"), "--steps", "3", "--wandb"])  # step 3 again
    assert [options["id"] for options in fake.inits] == [(run / "wandb_id").read_text()] * 2
    assert all(options["resume"] == "allow" for options in fake.inits) and set(fake.logged) == {3}
    assert FakeSummaryWriter.made == [3, 3]  # events from step 3 on are dropped: no step drawn twice
    train.main(small(tiny_agent, tmp_path / "new", "--steps", "1", "--wandb", "--eval-size", "0"))
    assert fake.inits[-1]["id"] != fake.inits[0]["id"] and FakeSummaryWriter.made[-1] == 0


def test_a_checkpoint_renamed_into_place_is_found_without_latest(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    (run / "checkpoints" / "latest").unlink()  # a kill between the rename and the switch of `latest`
    assert run_folder.find_checkpoint(str(run)).name == "step-000002"
    with pytest.raises(SystemExit, match="holds an earlier run"):
        train.main(["--output-dir", str(run)])


def test_checkpoints_are_readable_as_the_umask_says(vspo_run):
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = vspo_run / "checkpoints" / "step-000002"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~umask
    for path in checkpoint.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_eval_never_writes_over_an_earlier_evaluation_and_shows_progress(tiny_agent, tmp_path, capsys):
    arguments = ["--model", str(tiny_agent), "--limit", "2", "--output", str(tmp_path), "--max-new-tokens", "24",
                 "--no-few-shot", "--passage-chars", "60"]
    evaluation.main(arguments)
    assert "question" in capsys.readouterr().err  # the progress bar
    before = {path.name: path.read_text() for path in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match=r"--output .* would replace files already there \(wiki.jsonl, metrics.json"):
        evaluation.main(arguments)
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == before




# ---- What a run reads back must be what it wrote, or the run stops naming the file (nothing lost, nothing wrong published) ----
def edit_trainer_state(checkpoint: Path, edit) -> None:
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    models.write_digests(checkpoint)  # a consistent checkpoint whose contents say something else


def test_a_checkpoint_whose_step_disagrees_with_its_folder_is_refused_naming_the_file(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    edit_trainer_state(checkpoint, lambda state: state.update(step=7))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"{re.escape(str(checkpoint))}/trainer_state.json: field 'step' is 7, but "
                                         f"the checkpoint sits in step-000002"):
        train.main(["--resume", str(run), "--steps", "9"])
    assert (run / "metrics.jsonl").read_text() == before  # no log row dropped


def test_a_finished_run_whose_checkpoints_were_removed_is_never_replaced(vspo_run, tiny_agent, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")  # what benchmarks/grid.py does once a run is summarised
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds a run that saved checkpoints, since removed"):
        train.main(small(tiny_agent, run, "--steps", "2"))
    with pytest.raises(SystemExit, match="the run there saved checkpoints, since removed: nothing to resume"):
        train.main(["--resume", str(run)])
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("field, value, message", [
    ("reward", "PRS", "must be one of 'prs', 'binary'"), ("credit", "ISTAR", "must be one of 'outcome', 'istar'"),
    ("steps", 3.5, "must be an int, not float"), ("lr", "fast", "must be a float, not str"),
    ("few_shot", 1, "must be a bool, not int"), ("group_size", 1, "must be at least 2"),
    ("algorithm", None, "must be a str, not NoneType")])
def test_every_saved_setting_passes_its_flags_checks_naming_file_and_field(vspo_run, tmp_path, field, value, message):
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    edit_trainer_state(checkpoint, lambda state: state["args"].update({field: value}))
    further = [] if field == "steps" else ["--steps", "3"]  # a flag given overrides (and so repairs) its setting
    with pytest.raises(SystemExit, match=f"trainer_state.json: saved setting '{field}': {re.escape(message)}"):
        train.main(["--resume", str(run), *further])


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size, other bytes


def test_a_file_changed_in_place_is_named_before_it_is_used(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    flip_a_byte(checkpoint / "model.safetensors")
    with pytest.raises(SystemExit, match=f"{re.escape(str(checkpoint))}/model.safetensors: its bytes are not those "):
        evaluation.main(["--model", str(checkpoint), "--output", str(tmp_path / "eval")])
    with pytest.raises(SystemExit, match="model.safetensors: its bytes are not those"):
        train.main(["--resume", str(run), "--steps", "3"])
    shutil.copy(vspo_run / "checkpoints" / "step-000002" / "model.safetensors", checkpoint / "model.safetensors")
    flip_a_byte(checkpoint / "optimizer.pt")
    with pytest.raises(SystemExit, match="optimizer.pt: its bytes are not those"):
        train.main(["--resume", str(run), "--steps", "3"])
    assert not (tmp_path / "eval").exists()


def test_damaged_files_of_a_checkpoint_without_digests_are_named(vspo_run, tmp_path):
    # A checkpoint from before digests were written (or copied without them): a file cut short is still named.
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    (checkpoint / models.DIGESTS).unlink()
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=f"{re.escape(str(optimizer))}: unreadable as this run's optimizer"):
        train.main(["--resume", str(run), "--steps", "3"])
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(SystemExit, match=f"{re.escape(str(checkpoint))} is not a loadable model folder"):
        evaluation.main(["--model", str(checkpoint), "--output", str(tmp_path / "eval")])


def test_latest_that_is_a_folder_or_garbage_falls_back_to_the_newest_whole_checkpoint(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    latest = run / "checkpoints" / "latest"
    for damage in ("folder", b"\xff\xfe garbage"):
        latest.unlink() if latest.is_file() else latest.rmdir()
        latest.mkdir() if damage == "folder" else latest.write_bytes(damage)
        assert run_folder.find_checkpoint(str(run)).name == "step-000002"


@pytest.mark.parametrize("damage", ["dangling link", "link loop", "under /proc"])
def test_an_output_folder_that_cannot_be_made_or_written_is_named(tmp_path, damage):
    output = tmp_path / "run"
    if damage == "dangling link":
        output.symlink_to(tmp_path / "nowhere" / "deeper")
    elif damage == "link loop":
        output.symlink_to(output)
    else:
        output = Path("/proc/self/agentic-rl-run")  # not writable, whoever runs the test (root included)
    with pytest.raises(SystemExit, match=f"--output-dir {re.escape(str(output))}: cannot be used as a folder"):
        train.main(["--model", models.TINY, "--output-dir", str(output)])


def test_a_run_pid_that_is_a_folder_or_not_text_is_named_or_ignored(tmp_path):
    output = tmp_path / "run"
    (output / "run.pid").mkdir(parents=True)
    with pytest.raises(SystemExit, match="cannot write run.pid there .*not a plain file"):
        train.main(["--model", models.TINY, "--output-dir", str(output)])
    (output / "run.pid").rmdir()
    (output / "run.pid").write_bytes(b"\xff\xfe\x00 not text")
    with run_folder.exclusive(output):  # the holder's file rewritten: what a second process reads
        (output / "run.pid").write_bytes(b"\xff\xfe\x00 not text")
        with pytest.raises(SystemExit, match="in use by another run"):
            train.main(["--model", models.TINY, "--output-dir", str(output)])


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_behind_and_names_the_whole_one(vspo_run, tiny_agent,
                                                                                            tmp_path, monkeypatch):
    run = copy_run(vspo_run, tmp_path / "run")
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="step-000003: the checkpoint could not be written \\(No space left on device"
                                         "\\); what it had written is removed. .*step-000002 is whole"):
        train.main(["--resume", str(run), "--steps", "3"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]  # no .tmp-* left
    monkeypatch.setattr(torch, "save", real_save)
    train.main(["--resume", str(run), "--steps", "3"])  # space again: the run goes on from the whole checkpoint
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]


# ---- Found by an adversarial trial after round 3's fixes (each failed before its fix) ----
def test_a_latest_that_is_a_folder_is_named_before_a_step_is_trained(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    latest.mkdir()  # before: the run trained a step, then failed writing latest with a traceback
    with pytest.raises(SystemExit, match="checkpoints/latest: not a file"):
        train.main(["--resume", str(run), "--steps", "3"])
    assert [row["step"] for row in rows(run)] == [0, 1, 2] and not list(latest.parent.glob(".latest*"))


def test_a_save_that_fails_inside_torch_cleans_up_and_names_the_checkpoint(tiny_agent, tmp_path, monkeypatch):
    # a full disk reaches torch.save's writer as a RuntimeError, not an OSError: before, a traceback and a
    # temporary checkpoint left filling the disk
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 12588224 vs 12588112")

    monkeypatch.setattr(run_folder.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"step-000001: the checkpoint could not be written \(RuntimeError"):
        train.main(small(tiny_agent, tmp_path / "run", "--steps", "1"))
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_a_log_row_cut_short_before_the_checkpoint_is_named_not_dropped(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    (run / "metrics.jsonl").write_text(text[:-50], encoding="utf-8")  # the step-2 row cut short
    with pytest.raises(SystemExit, match="metrics.jsonl: no readable row for step 2 "):
        train.main(["--resume", str(run), "--steps", "3"])  # before: exit 0, and step 2's row gone for good
    assert (run / "metrics.jsonl").read_text(encoding="utf-8") == text[:-50]


@pytest.mark.parametrize("kept", ["all but the weights", "none"])
def test_a_file_the_digests_do_not_list_is_named(vspo_run, tmp_path, kept):
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    digests = checkpoint / models.DIGESTS
    lines = [line for line in digests.read_text().splitlines() if not line.endswith("  model.safetensors")]
    digests.write_text("".join(f"{line}\n" for line in lines) if kept != "none" else "")
    flip_a_byte(checkpoint / "model.safetensors", 200_000)  # before: loaded unchecked and trained on
    with pytest.raises(SystemExit, match="model.safetensors: not listed in" if kept != "none" else "not listed in"):
        train.main(["--resume", str(run), "--steps", "3"])


def test_latest_naming_a_checkpoint_that_is_not_whole_is_named_and_the_checkpoint_kept(vspo_run, tmp_path):
    run = copy_run(vspo_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002"
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(SystemExit, match="names step-000002, which is not a whole checkpoint"):
        train.main(["--resume", str(run), "--steps", "3"])  # before: resumed from step 1, and step 2 deleted
    assert (checkpoint / "model.safetensors").exists()
