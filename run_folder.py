"""What a training run leaves in its output folder, and how a run reads it back: the logs, the curves, checkpoints.

    runs/default/
        args.json                   the run's settings (the judge's API key blanked)
        metrics.jsonl               one row per step: {"step": N, "reward": ..., ...}; step 0 is the evaluation before
        samples.jsonl               a few trajectories per step, for reading what the agent wrote
        training_curves.png         redrawn at every checkpoint, or by `python train.py --plot-only runs/default`
        tensorboard/                when tensorboard is installed
        wandb_id                    with --wandb: the wandb run a resumed run goes on in
        run.pid                     the process training in the folder, while it does (see `exclusive`)
        judge_cache.jsonl           the judge's verdicts, for long-form tasks
        checkpoints/latest          the name of the newest whole checkpoint
        checkpoints/step-000008/    a save_pretrained folder (transformers and vLLM load it as it is), plus
                                    trainer_state.json (step, data position, value buffer, settings: JSON),
                                    optimizer.pt (optimizer and RNG states: tensors), prm/ for iStar, and
                                    checksums.sha256 (every file's digest, checked when the checkpoint is read)

Checkpoints are written atomically: into a temporary folder that is flushed to disk and renamed into place, after
which `latest` is switched, so a kill (or a power cut) at any moment leaves `latest` on a whole checkpoint. `save`
and `restore` know what train.py's Run and State hold (the policy, its optimizer, the data stream, the value buffer,
the random states, the PRM); whatever is read back is checked (digests, types, the step against its folder) and a
file that fails is named, never half used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm import tqdm

try:
    import fcntl  # POSIX; where it is missing (Windows), runs are not locked
except ImportError:
    fcntl = None

import models
from cli import UsageError, check_setting
from data import PromptStream
from prs import format_score
from vspo import ValueBuffer


def jsonl_line(record: dict) -> str:
    """One jsonl line for `record`, non-ASCII text kept readable. A model can write any escape, also a lone
    surrogate ("\\ud800"), which UTF-8 cannot encode; it is written as its JSON escape, so the line is valid UTF-8
    and reads back to the same string.

    >>> jsonl_line({"query": "\\ud800 Paris, café"})
    '{"query": "\\\\ud800 Paris, café"}\\n'
    >>> json.loads(jsonl_line({"query": "\\ud800 Paris"}))["query"] == "\\ud800 Paris"
    True
    """
    text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n"  # only lone surrogates are replaced


def mean_of(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def saved_args(args) -> dict:
    """A run's settings as written to disk (args.json, trainer_state.json, wandb): everything but the API key."""
    return asdict(args) | {"judge_api_key": ""}


# ---- Checkpoints and resume ----
@contextlib.contextmanager
def exclusive(output: Path, flag: str = "--output-dir"):
    """Hold the folder while a run trains in it: a second process started on it (a second terminal, a grid launched
    twice) stops at once with an error naming the one that holds it. The lock is an OS lock (flock) on the folder,
    which the OS lets go when the process ends, however it ends (kill -9 included): no stale lock is ever left.
    `run.pid` names the holder for that error (a killed run leaves it behind, where it means nothing). `flag` names
    the folder in errors (eval.py holds its --output, benchmarks/grid.py its --runs). A folder that cannot be made or
    written (a file, a link to nowhere or to itself, no permission, a full disk) is an error naming it."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        folder = os.open(output, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        raise UsageError(f"{flag} {output}: cannot be used as a folder ({error.strerror or error}); choose a folder "
                         f"you can write in") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = "another process"
                with contextlib.suppress(OSError):  # run.pid, as the holder wrote it (or anything else found there)
                    holder = (output / "run.pid").read_bytes()[:200].decode("utf-8", "replace").strip() or holder
                raise UsageError(f"{flag} {output}: in use by another run ({holder}); wait for it to end, or choose "
                                 f"another {flag}") from None
        pid_file = output / "run.pid"
        try:
            if pid_file.is_dir() or pid_file.is_symlink():
                raise IsADirectoryError(f"{pid_file} is not a plain file: move it away")
            pid_file.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as error:
            raise UsageError(f"{flag} {output}: cannot write {pid_file.name} there ({error.strerror or error}); "
                             f"choose a folder you can write in") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                pid_file.unlink()
    finally:
        os.close(folder)  # lets the lock go


def checkpoint_to_resume(args) -> Path | None:
    """The checkpoint that --resume names (None for a new run), after checking that the run can start from it, and
    that a new run does not write over an earlier one. A folder whose run stopped before its first checkpoint (its
    logs, no checkpoint) has nothing to resume: a new run takes it, and says so."""
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    output = Path(args.output_dir)  # a folder: train.main holds it (`exclusive`) before it calls this
    latest = output / "checkpoints" / "latest"
    if latest.is_symlink() or (latest.exists() and not latest.is_file()):  # the run would fail at its first save
        raise UsageError(f"{latest}: not a file (it holds the name of the newest checkpoint, step-NNNNNN); move it "
                         f"away, or choose another --output-dir")
    own_folder = checkpoint is not None and checkpoint.parent.name == "checkpoints" and \
        checkpoint.parent.parent.resolve() == output.resolve()
    earlier = newest_checkpoint(output)
    if checkpoint is None and earlier is not None:
        raise UsageError(f"--output-dir {output} holds an earlier run: continue it with --resume {output}, or "
                         f"choose another --output-dir")
    if checkpoint is not None and not own_folder and earlier is not None:
        raise UsageError(f"--output-dir {output} holds another run: resuming {checkpoint} there would write over "
                         f"its logs and checkpoints; choose an empty --output-dir, or --resume {output} to go on "
                         f"with that run")
    if earlier is None and _saved_a_checkpoint(output):
        raise UsageError(f"--output-dir {output} holds a run that saved checkpoints, since removed (a finished run "
                         f"whose logs were kept, as benchmarks/grid.py keeps them): a new run would replace its logs; "
                         f"choose another --output-dir")
    if not own_folder and (output / "metrics.jsonl").exists():  # logs and no checkpoint: a run that was cut short
        # (this same branch, killed before its first checkpoint, is started again as a new run would be)
        this_run = f"this run (from {checkpoint})" if checkpoint else "this run starts again from step 0 in it and"
        print(f"note: {output} holds a run that stopped before its first checkpoint; {this_run} replaces its logs")
    if checkpoint is not None and args.credit == "istar" and not (checkpoint / "prm").exists():
        raise UsageError(f"--resume {checkpoint}: trained with --credit outcome, it has no implicit PRM to resume "
                         f"with --credit istar")
    return checkpoint


def save(run, state) -> Path:
    """Write <output_dir>/checkpoints/step-NNNNNN atomically for train.py's Run and State, with every file's SHA-256
    (models.DIGESTS), switch `latest` to it, and delete all but the --keep-checkpoints newest. A save that fails (a
    full disk) leaves nothing of itself behind and stops the run, naming the checkpoint still whole."""
    root = Path(run.args.output_dir) / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        _write_checkpoint(run, state, tmp)
        models.write_digests(tmp)
        _open_to_umask(tmp)  # mkdtemp makes the folder private, safetensors the weights: a teammate's server reads them
        _sync(tmp)  # on disk before the rename makes it whole: a power cut after it loses no file the name promises
    except Exception as error:  # a full disk: OSError from files, RuntimeError from torch.save's writer
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        whole = None
        with contextlib.suppress(UsageError):
            whole = newest_checkpoint(Path(run.args.output_dir))
        cause = getattr(error, "strerror", None) or f"{type(error).__name__}: {str(error)[:200]}; a full disk?"
        raise UsageError(f"{final}: the checkpoint could not be written ({cause}); what it had "
                         f"written is removed. {f'{whole} is whole: free space and --resume it' if whole else ''}"
                         f"{'' if whole else 'No earlier checkpoint: free space and start the run again'}") from None
    if final.exists():  # a checkpoint of this step from a run that went back: set it aside first, atomically
        os.replace(final, tmp.with_name(tmp.name + "-replaced"))
    os.replace(tmp, final)
    _sync_folder(root)
    write_atomically(root / "latest", final.name)
    older = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit() and _step_of(p) < state.step), key=_step_of)
    for stale in older[:max(0, len(older) - (run.args.keep_checkpoints - 1))] + list(root.glob(".tmp-*")):
        if stale.is_dir() and not stale.is_symlink():  # old checkpoints, and leftovers of runs killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return final


def _write_checkpoint(run, state, folder: Path) -> None:
    run.policy.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    torch.save({"optimizer": run.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "generator": state.generator.get_state(),
                "prm_optimizer": run.prm.state_dict() if run.prm else None}, folder / "optimizer.pt")
    trainer_state = {"step": state.step, "stream": state.stream.state_dict(), "buffer": state.buffer.state_dict(),
                     "rng": state.rng.bit_generator.state, "args": saved_args(run.args),
                     "data": data_fingerprint(state.stream.examples)}
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if run.prm:  # a loadable model folder of its own
        run.prm.model.save_pretrained(folder / "prm")
        run.tokenizer.save_pretrained(folder / "prm")


def restore(checkpoint: Path, optimizer, prm, state, args) -> None:
    """Load a checkpoint's optimizer, RNG, data position and value buffer into a fresh run's state, after checking its
    files against their digests. Flags given on the command line win over saved settings: the learning rate, weight
    decay and buffer smoothing come from args. Whatever cannot be read back is an error naming the file."""
    if (checkpoint / models.DIGESTS).exists():  # (the model's own files were checked when it was loaded)
        models.check_digests(checkpoint, lambda path: "/" in path or path in ("optimizer.pt", "trainer_state.json"))
    saved = trainer_state(checkpoint)
    found = data_fingerprint(state.stream.examples)
    if saved.get("data", found) != found:  # checkpoints from before the fingerprint was saved are not checked
        raise UsageError(f"--task {args.task}: not the training data {checkpoint} was trained on "
                         f"({saved['data'].get('questions')} questions then, {found['questions']} now, or the same "
                         f"count with other questions or order); its data position and value buffer refer to that "
                         f"data, so resume with it")
    path = checkpoint / "optimizer.pt"
    try:
        tensors = torch.load(path, weights_only=True)
        optimizer.load_state_dict(tensors["optimizer"])
        torch.set_rng_state(tensors["torch_rng"])
        if tensors["cuda_rng"]:
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        state.generator.set_state(tensors["generator"])
        if prm:
            prm.load_state_dict(tensors["prm_optimizer"])  # at the PRM's learning rate, from args
    except Exception as error:  # torch.load and load_state_dict raise many kinds on a damaged or foreign file
        raise UsageError(f"{path}: unreadable as this run's optimizer and random states ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    path = checkpoint / "trainer_state.json"
    try:
        state.stream = PromptStream(state.stream.examples, state.stream.seed, **saved["stream"])
        state.buffer = ValueBuffer.from_state_dict(saved["buffer"] | {"ema_alpha": args.value_ema})
        state.rng.bit_generator.state = saved["rng"]
    except (TypeError, ValueError, KeyError) as error:
        raise UsageError(f"{path}: its data position, value buffer or random state cannot be read back "
                         f"({type(error).__name__}: {str(error)[:200]})") from None
    state.step = saved["step"]


def trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json, checked: the fields train.py wrote, of their types, and a step that agrees
    with the folder it sits in (step-000007 holds step 7). Errors name the file and the field."""
    path = checkpoint / "trainer_state.json"
    saved = read_json(path)
    kinds = {"step": int, "args": dict, "stream": dict, "buffer": dict, "rng": dict}
    for name, kind in kinds.items():
        value = saved.get(name) if isinstance(saved, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{path}: field {name!r} is {value!r}, not a{'n' if kind is int else ''} "
                             f"{'integer' if kind is int else 'JSON object'}: the file is not a whole trainer state")
    if saved["step"] < 0 or (checkpoint.name.startswith("step-") and checkpoint.name[5:].isdigit()
                             and int(checkpoint.name[5:]) != saved["step"]):
        raise UsageError(f"{path}: field 'step' is {saved['step']}, but the checkpoint sits in {checkpoint.name}: "
                         f"its files do not agree with where they are; resume from another checkpoint")
    if not isinstance(saved.get("data", {}), dict):
        raise UsageError(f"{path}: field 'data' is {saved['data']!r}, not a JSON object")
    return saved


def data_fingerprint(examples) -> dict:
    """What a checkpoint remembers of its training data: how many questions, and a hash of their ids, questions and
    answers in order. The data position and the value buffer's keys mean something only for that data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.id, example.question, list(example.answers), example.reference]).encode())
    return {"questions": len(examples), "sha256": digest.hexdigest()}


def go_back(output: Path, step: int) -> None:
    """A run resumed in its own folder from a checkpoint older than the newest goes on from it: `latest` names it at
    once, so that a kill before the next save resumes it again (Logger drops the later steps' log rows)."""
    root, name = output / "checkpoints", f"step-{step:06d}"
    if (root / name / "trainer_state.json").exists() and newest_checkpoint(output) != root / name:
        write_atomically(root / "latest", name)


def _open_to_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir or open would have (0777 / 0666 less the umask), as
    save_pretrained's own files have."""
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(folder):
        os.chmod(parent, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)


def _sync(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk (a rename alone is atomic against a
    kill, not against a power cut: the new name can reach the disk before the file's data)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(parent, name), "rb") as file:
                os.fsync(file.fileno())
        _sync_folder(Path(parent))


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all: a kill leaves the old file or the new one, and a power cut
    too (the bytes and the folder's entry reach the disk before and after the rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone once replaced)
    _sync_folder(path.parent)


def find_checkpoint(resume: str) -> Path:
    """A checkpoint folder, or the latest checkpoint under an output folder."""
    path = Path(resume)
    if (path / "trainer_state.json").exists():
        return path
    checkpoint = newest_checkpoint(path)
    if checkpoint is not None:
        return checkpoint
    if _saved_a_checkpoint(path):
        raise UsageError(f"--resume {resume}: the run there saved checkpoints, since removed: nothing to resume")
    if (path / "metrics.jsonl").exists():
        branched = ""  # the --resume the cut-short run was started with, from args.json
        with contextlib.suppress(OSError, ValueError, AttributeError):
            branched = str(json.loads((path / "args.json").read_text()).get("resume") or "")
        again = (f"run the command that started it again (--resume {branched} --output-dir {resume}, and its other "
                 f"flags: {path / 'args.json'})" if branched else
                 "run it again without --resume (it starts from step 0 in the same folder)")
        raise UsageError(f"--resume {resume}: the run there stopped before its first checkpoint, so there is nothing "
                         f"to resume; {again}")
    raise UsageError(f"--resume {resume}: no checkpoint there (expected a checkpoint folder with "
                     f"trainer_state.json, or an output folder with checkpoints/)")


def newest_checkpoint(output: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names; else (a kill between a checkpoint's rename and the switch of
    `latest`) the newest whole one: a step-NNNNNN folder is whole once it exists, since it is renamed into place."""
    root = output / "checkpoints"
    named = ""
    with contextlib.suppress(OSError, UnicodeDecodeError):  # a `latest` that is a folder or garbage names nothing
        named = (root / "latest").read_text(encoding="utf-8").strip()
    if named.startswith("step-") and named[5:].isdigit() and (root / named / "trainer_state.json").is_file():
        return root / named
    if named.startswith("step-") and named[5:].isdigit() and os.path.lexists(root / named):
        raise UsageError(f"{root / 'latest'} names {named}, which is not a whole checkpoint (no trainer_state.json "
                         f"in it): restore it, or point latest at another checkpoint")
    whole = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(whole, key=_step_of) if whole else None


def _saved_a_checkpoint(output: Path) -> bool:
    """Whether the run logged in `output` saved a checkpoint at some step (its metrics row has the save's time)."""
    return (output / "metrics.jsonl").is_file() and any("time_checkpoint" in row
                                                         for row in read_jsonl(output / "metrics.jsonl"))


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a UsageError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: not a JSON object")
    return value


def resumed_args(args, argv: list[str]):
    """With --resume, the run's saved settings, overridden by the flags given on this command line (e.g. --steps to
    train further). The run goes on in the output folder the checkpoint is in, unless --output-dir says otherwise."""
    checkpoint = find_checkpoint(args.resume)
    saved = trainer_state(checkpoint)["args"]
    given = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    given |= {name.removeprefix("no_") for name in given}
    names = {f.name for f in fields(args)}
    merged = {name: value for name, value in saved.items() if name in names}
    for name, value in merged.items():  # each saved setting passes its flag's checks, or the file is named
        if name not in given:
            try:
                check_setting(type(args), name, value)
            except UsageError as error:
                raise UsageError(f"{checkpoint / 'trainer_state.json'}: saved setting {name!r}: "
                                 f"{str(error).split(': ', 1)[-1]} (is {value!r}); resume with --"
                                 f"{name.replace('_', '-')} given, or from another checkpoint") from None
    if checkpoint.parent.name == "checkpoints":  # <output_dir>/checkpoints/step-NNNNNN, wherever it was moved
        merged["output_dir"] = str(checkpoint.parent.parent)
    elif "output_dir" not in given:
        raise UsageError(f"--resume {args.resume}: this checkpoint is not inside an output folder's checkpoints/; "
                         f"say where the run goes on with --output-dir")
    merged |= {name: getattr(args, name) for name in names if name in given or name == "resume"}
    return type(args)(**merged)


# ---- Logs: metrics.jsonl, samples.jsonl, TensorBoard, wandb ----
class Logger:
    def __init__(self, folder: Path, args, start_step: int):
        """The run's logs in `folder`, for a run that starts after `start_step`; writes its settings (args.json)."""
        self.folder = folder
        go_back(folder, start_step)
        write_atomically(folder / "args.json", json.dumps(saved_args(args), indent=1))
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        # A run resumed from a checkpoint of this folder keeps the rows up to it; any other run replaces what a run
        # that stopped before its first checkpoint wrote here.
        own = start_step and (folder / "checkpoints" / f"step-{start_step:06d}" / "trainer_state.json").exists()
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                rows = [row for row in read_jsonl(path) if isinstance(row, dict) and isinstance(row.get("step"), int)
                        and row["step"] <= start_step] if own else []
                missing = sorted(set(range(1, start_step + 1)) - {row["step"] for row in rows})
                if path == self.metrics_path and own and missing:  # a row cut short or changed: it would be lost
                    raise UsageError(f"{path}: no readable row for step {', '.join(map(str, missing[:5]))} of the "
                                     f"run up to its checkpoint; restore the file, or move it away to resume "
                                     f"without the earlier rows")
                write_atomically(path, "".join(jsonl_line(row) for row in rows))
        self.tensorboard = self.wandb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            # events after the start step are dropped, as the rows of metrics.jsonl are: no step is drawn twice
            self.tensorboard = SummaryWriter(str(folder / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else 0)
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            # one wandb run per output folder: a resumed run goes on in the run it started (its id kept in the folder)
            id_file = folder / "wandb_id"
            if start_step and id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                write_atomically(id_file, run_id)
            self.wandb = wandb.init(project="agentic-rl", config=saved_args(args), dir=str(folder), id=run_id,
                                    resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        for name in ("tool_failures", "eval_tool_failures"):
            if metrics.get(name):  # the agent read error strings where passages should have been: say so
                tqdm.write(f"step {step}: {metrics[name]:.0f} valid tool calls failed in the tool itself ({name}; "
                           f"is the retrieval server up?); the agent read the error as its observation")
        for name, value in metrics.items():
            if self.tensorboard and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def amend(self, step: int, metrics: dict) -> None:
        """Add `metrics` to the last row of metrics.jsonl (step `step`), atomically: the file is rewritten and renamed
        into place, so a kill leaves the row with or without them, never half."""
        rows = read_jsonl(self.metrics_path)
        assert rows and rows[-1]["step"] == step, "amend the row just logged"
        rows[-1] |= metrics
        write_atomically(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        for name, value in metrics.items():
            if self.tensorboard:
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def samples(self, step: int, groups, count: int) -> None:
        """The first `count` trajectories of the step's groups, with their rewards, into samples.jsonl."""
        rows = [{"step": step, "question": g.example.question, "gold": list(g.example.answers), "reward": r.total,
                 "stages": r.stages, "stop_reason": t.stop_reason, "response": t.text}
                for g in groups for t, r in zip(g.trajectories, g.results)][:count]
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            handle.writelines(jsonl_line(row) for row in rows)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def step_metrics(trained, everything, stats: dict, update_stats: dict, timer: PhaseTimer,
                 prompts_per_step: int) -> dict:
    """One row of metrics.jsonl: means over every trajectory rolled out this step (replacements included) of the
    reward, its stages, EM, answers and tool calls; the replacement counts; then the update's diagnostics."""
    every = [(t, r) for g in everything for t, r in zip(g.trajectories, g.results)]
    metrics = {"reward": mean_of(r.total for _, r in every), "exact_match": mean_of(r.exact_match for _, r in every),
               "answered": mean_of(t.answer is not None for t, _ in every),
               "well_formed": mean_of(format_score(t.text) for t, _ in every)}  # whatever the reward, PRS's format
    for stage in sorted({s for _, r in every for s in r.stages}):
        metrics[f"stage_{stage}"] = mean_of(r.stages.get(stage) for _, r in every)
    sampled = sum(sum(t.loss_mask) for t, _ in every)
    metrics |= {"dead_fraction": stats["dead_fraction"],
                "extra_rollouts_per_prompt": stats["extra_rollouts"] / prompts_per_step,
                "replayed_prompts": stats["replayed"], "unscored": stats["unscored"],
                "trajectories": len(every),  # sampled this step: prompts x G, plus the replacements
                "trained_on": sum(len(g.scored()) for g in trained),
                "dead_in_batch": mean_of(g.dead for g in trained),  # after replacement: zero-advantage groups
                "response_tokens": sampled / max(len(every), 1),
                "tool_calls": mean_of(len(t.tool_calls) for t, _ in every),
                "tool_failures": sum(c.failed for t, _ in every for c in t.tool_calls),  # valid calls whose tool raised
                "rollout_tokens_per_s": sampled / max(timer.seconds["rollout"] + timer.seconds["replacement"], 1e-9)}
    return metrics | update_stats


def postfix(metrics: dict) -> dict:
    """The figures shown on the progress bar."""
    shown = {"reward": "reward", "fmt": "stage_format", "tool": "stage_tool_call", "ans": "stage_answer",
             "em": "exact_match", "dead": "dead_fraction", "extra": "extra_rollouts_per_prompt", "kl": "kl_ref",
             "clip": "clip_fraction", "tok/s": "rollout_tokens_per_s"}
    return {short: f"{metrics[name]:.3g}" for short, name in shown.items() if metrics.get(name) is not None}


class PhaseTimer:
    """Wall-clock seconds of a step's phases: `with timer("rollout"): ...`; metrics() gives them as time_<phase>."""

    PHASES = ("rollout", "rewards", "replacement", "logprobs", "istar", "update", "evaluation", "checkpoint")

    def __init__(self):
        self.seconds = Counter()
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self, *phases: str) -> dict:
        """time_<phase> of the phases given (default: all that ran) and step_seconds, the wall time since the timer
        was made."""
        ran = phases or [phase for phase in self.PHASES if phase in self.seconds]
        return {f"time_{phase}": self.seconds[phase] for phase in ran} | {
            "step_seconds": time.perf_counter() - self.started}


def time_summary(folder: Path) -> str:
    """One line: the seconds each phase took over the run's metrics.jsonl, and their share of the whole."""
    rows = read_jsonl(folder / "metrics.jsonl")
    seconds = {phase: sum(row.get(f"time_{phase}", 0.0) for row in rows) for phase in PhaseTimer.PHASES}
    total = sum(row.get("step_seconds", 0.0) for row in rows)
    parts = [f"{phase} {value:.0f} s ({value / total:.0%})" for phase, value in seconds.items() if value and total]
    return f"time by phase: {', '.join(parts)}; all {total:.0f} s" if parts else ""


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl log; a last line cut short by a kill is skipped. Lines end at "\n" only: str.splitlines
    would also break a row at U+2028, U+2029 or U+0085, which JSON leaves unescaped in a row's text."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows
