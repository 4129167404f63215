"""Issue 14: a checkpoint never runs code and is verified before use, Ctrl-C saves, and
user mistakes (config, data, generation flags, files) are one ``error:`` line. README's
Reliability table points at these tests."""

import builtins
import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints import CheckpointError
from checkpoints.export import save_export
from checkpoints.publish import verify_checkpoint, write_manifest
from checkpoints.sharded import load_model_weights, read_metadata
from megatron_transfusion.config import ConfigError, UserError, load_config
from tests.conftest import ROOT
from tests.test_loader import config as loader_config
from tests.test_loader import prepare
from tests.test_trainer import TRAIN, overrides, run

GENERATE = "from megatron_transfusion.inference.cli import generate_main; generate_main()"
CHECKPOINT_TOOL = "from checkpoints.cli import main; main()"
STEP = "step_00000002"


class Exploit:
    """Unpickled, it creates ``marker``: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-data")
    prepare(root)
    return root


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """A real two-step run (one process) with its checkpoint at step 2."""
    run_root = tmp_path_factory.mktemp("reliability-run")
    run(1, overrides(data_root, run_root, 2))
    return run_root


@pytest.fixture
def run_copy(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def step_dir(run_root):
    return run_root / "tiny" / "checkpoints" / STEP


def cli(code, *args):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )


def assert_one_line_error(result, *parts):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(p in last for p in parts), result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


# ---- A checkpoint never runs code --------------------------------------------------------


def plant(step, name, data: bytes) -> None:
    """Replace a checkpoint file as whoever can write the checkpoint could: with a manifest
    that agrees, so only the way the file is read stands between it and its code."""
    (step / name).write_bytes(data)
    write_manifest(step)


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def plant_exploit(step, planted, marker) -> None:
    if planted == "engine/.metadata":
        plant(step, planted, pickle.dumps(Exploit(marker)))
    elif planted == "engine/common.pt":
        plant(step, planted, torch_saved(Exploit(marker)))
    else:  # one of Megatron's byte items (an _extra_state), moved into a file of its own
        payload = torch_saved(Exploit(marker))
        (step / planted).write_bytes(payload)
        metadata = read_metadata(step / "engine")
        index = next(k for k in metadata.storage_data if "_extra_state" in k.fqn)
        info = metadata.storage_data[index]
        metadata.storage_data[index] = type(info)(
            relative_path=planted.split("/")[-1], offset=0, length=len(payload)
        )
        plant(step, "engine/.metadata", pickle.dumps(metadata))


@pytest.mark.parametrize(
    "planted", ["engine/.metadata", "engine/common.pt", "engine/__evil.distcp"]
)
def test_a_planted_pickle_never_runs(megatron_world, run_copy, tmp_path, planted):
    """Loading for generation, export or resume goes through one reader."""
    from megatron_transfusion.model import build_model

    step, marker = step_dir(run_copy), tmp_path / "code-ran"
    plant_exploit(step, planted, marker)
    verify_checkpoint(step)  # the manifest agrees: only the reader stands in the way
    cfg = load_config(str(run_copy / "tiny" / "config.yaml"), ["model.attention_backend=sdpa"])
    (model,) = build_model(cfg, megatron_world)
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint file '{step / planted}'")
    ) as info:
        load_model_weights([model], step)
    assert "nothing in it was run" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["generate", "inspect", "export", "resume"])
def test_every_entry_point_refuses_a_planted_metadata_pickle(
    run_copy, data_root, tmp_path, command
):
    step, marker = step_dir(run_copy), tmp_path / "code-ran"
    plant_exploit(step, "engine/.metadata", marker)
    if command == "generate":
        result = cli(GENERATE, run_copy / "tiny", "--prompt", "red", "--steps", "1")
    elif command == "resume":
        result = cli(
            TRAIN, "--config", "tiny", *overrides(data_root, run_copy, 4), "--resume", "auto"
        )
    else:
        result = cli(
            CHECKPOINT_TOOL,
            command,
            step,
            *(["--out", tmp_path / "m.safetensors"] if command == "export" else []),
        )
    assert_one_line_error(
        result, f"checkpoint file '{step / 'engine' / '.metadata'}'", "nothing in it was run"
    )
    assert not marker.exists()


# ---- A damaged checkpoint is refused, naming the file --------------------------------------


def test_the_manifest_covers_every_file_of_a_published_checkpoint(trained_run):
    step = step_dir(trained_run)
    files = json.loads((step / "manifest.json").read_text())["files"]
    on_disk = sorted(
        str(p.relative_to(step))
        for p in step.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(files) == on_disk and "engine/.metadata" in files and "trainer.json" in files
    verify_checkpoint(step)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "does not match its SHA-256 in manifest.json"),
        ("truncate", "bytes, manifest.json says"),
        ("delete", "is missing"),
    ],
)
def test_a_damaged_checkpoint_file_is_refused_by_name(run_copy, damage, message):
    step = step_dir(run_copy)
    target = sorted((step / "engine").glob("*.distcp"))[0]
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(data)
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file '{target}' ")) as info:
        verify_checkpoint(step)
    assert message in str(info.value) and "--no-verify" in str(info.value)


def test_resume_and_tools_refuse_a_flipped_byte_unless_told_not_to_verify(run_copy, data_root):
    step = step_dir(run_copy)
    target = step / "trainer.json"
    target.write_text(target.read_text().replace('"step": 2', '"step": 3'))
    result = cli(TRAIN, "--config", "tiny", *overrides(data_root, run_copy, 4), "--resume", "auto")
    assert_one_line_error(result, f"checkpoint file '{target}'", "does not match its SHA-256")
    assert_one_line_error(cli(CHECKPOINT_TOOL, "inspect", step), f"checkpoint file '{target}'")
    result = cli(CHECKPOINT_TOOL, "inspect", step, "--no-verify")
    assert result.returncode == 0 and '"step": 3' in result.stdout, result.stderr[-3000:]


def test_an_unverified_truncated_data_file_is_named(run_copy, tmp_path):
    """--no-verify skips the manifest; torch's reader would then end in a bare EOFError."""
    step = step_dir(run_copy)
    target = sorted((step / "engine").glob("*.distcp"))[0]
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    result = cli(
        CHECKPOINT_TOOL, "export", step, "--no-verify", "--out", tmp_path / "m.safetensors"
    )
    assert_one_line_error(
        result, f"checkpoint file '{target}' has {size // 2} bytes", "it is truncated"
    )


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(megatron_world, run_copy, capsys):
    from megatron_transfusion.model import build_model

    step = step_dir(run_copy)
    (step / "manifest.json").unlink()
    verify_checkpoint(step)
    assert f"warning: '{step}' has no manifest.json" in capsys.readouterr().err
    cfg = load_config(str(run_copy / "tiny" / "config.yaml"), ["model.attention_backend=sdpa"])
    (model,) = build_model(cfg, megatron_world)
    load_model_weights([model], step)


def mutations(data: bytes, rng: random.Random):
    """A flipped byte, a truncation and random bytes in place of part of the file."""
    flipped = bytearray(data)
    flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    cut = rng.randrange(len(data))
    start = rng.randrange(len(data))
    noise = bytes(rng.randrange(256) for _ in range(min(64, len(data) - start)))
    return {
        "flip": bytes(flipped),
        "truncate": data[:cut],
        "noise": data[:start] + noise + data[start + len(noise) :],
    }


def test_fuzzed_checkpoint_files_are_clean_errors(megatron_world, trained_run, tmp_path):
    """Every file, three kinds of damage: verification names it. Unverified, the files
    the model is read from still give a clean error naming them (or load, where the damage
    is harmless to reading: a flipped bit in a tensor)."""
    from megatron_transfusion.model import build_model

    rng = random.Random(14)
    source = step_dir(trained_run)
    cfg = load_config(str(trained_run / "tiny" / "config.yaml"), ["model.attention_backend=sdpa"])
    (model,) = build_model(cfg, megatron_world)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        name = str(path.relative_to(source))
        for kind, data in mutations(path.read_bytes(), rng).items():
            step = tmp_path / f"{kind}-{name.replace('/', '_')}"
            shutil.copytree(source, step)
            (step / name).write_bytes(data)
            with pytest.raises(CheckpointError) as info:
                verify_checkpoint(step)
            assert str(step / name) in str(info.value) or name == "manifest.json", (
                name,
                kind,
                info.value,
            )
            if name in ("engine/.metadata", "engine/common.pt") or name.endswith(".distcp"):
                try:
                    load_model_weights([model], step)
                except CheckpointError as e:
                    assert str(step / name) in str(e), (name, kind, e)


# ---- Ctrl-C -------------------------------------------------------------------------------


def start_training(data_root, run_root, steps):
    """One process, no torchrun: Ctrl-C in a terminal signals it directly."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRAIN,
            "--config",
            "tiny",
            *overrides(data_root, run_root, steps, "checkpoint.interval=1000"),
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(600, process.kill)  # never hang the suite
    watchdog.daemon = True
    watchdog.start()
    metrics = run_root / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
        and time.time() < deadline
    ):
        assert process.poll() is None, process.stdout.read()[-4000:]
        time.sleep(0.2)
    return process


def test_first_ctrl_c_finishes_the_step_saves_and_exits_3(data_root, tmp_path):
    process = start_training(data_root, tmp_path, 1000)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 3, output[-4000:]
    assert (
        "interrupted: saving a checkpoint after this step" in output
        and "stop requested: saved step" in output
    )
    saved = int((tmp_path / "tiny" / "checkpoints" / "latest").read_text()[-8:])
    assert 2 <= saved < 1000
    resumed = run(1, overrides(data_root, tmp_path, saved + 1) + ["--resume", "auto"])
    assert f"at step {saved}" in resumed


def test_second_ctrl_c_exits_at_once_without_saving(data_root, tmp_path):
    process = start_training(data_root, tmp_path, 1000)
    process.send_signal(signal.SIGINT)
    seen = []
    while not (seen and "interrupted: saving" in seen[-1]):
        line = process.stdout.readline()
        assert line, "".join(seen)[-4000:]
        seen.append(line)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT, (process.returncode, rest[-4000:])
    assert "stop requested" not in rest
    assert not (tmp_path / "tiny" / "checkpoints" / "latest").exists()


# ---- User mistakes at training start -------------------------------------------------------


def other_tokenizer_copy(data_root, tmp_path):
    """The text dataset as if sharded with another tokenizer."""
    shutil.copytree(data_root / "text", tmp_path / "text")
    manifest = json.loads((tmp_path / "text" / "manifest.json").read_text())
    manifest["tokenizer"] = {**manifest["tokenizer"], "path": "other.json", "sha256": "0" * 64}
    (tmp_path / "text" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "text"


def test_data_mistakes_at_training_start_are_user_errors(data_root, tmp_path):
    from megatron_transfusion.data import MixedModalityLoader

    other = other_tokenizer_copy(data_root, tmp_path)
    with pytest.raises(UserError, match="tokenized with another tokenizer"):
        MixedModalityLoader(loader_config(data_root, f"data.sources.0.path={other}"))
    empty = tmp_path / "empty"
    shutil.copytree(data_root / "text", empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "num_samples": 0, "files": {}}))
    (empty / "index.json").write_text(
        json.dumps({**json.loads((empty / "index.json").read_text()), "shards": []})
    )
    np.save(empty / "lengths.npy", np.zeros(0, dtype=np.int64))
    with pytest.raises(UserError, match="data source '.*' has no samples"):
        MixedModalityLoader(loader_config(data_root, f"data.sources.0.path={empty}"))


def test_train_reports_a_data_mistake_in_one_line(data_root, tmp_path):
    other = other_tokenizer_copy(data_root, tmp_path)
    result = cli(
        TRAIN,
        "--config",
        "tiny",
        *overrides(data_root, tmp_path, 2, f"data.sources.0.path={other}"),
    )
    assert_one_line_error(result, "tokenized with another tokenizer")


# ---- Under the launcher (torchrun) -----------------------------------------------------------


def launched(nproc, *args) -> subprocess.Popen:
    """``python -m megatron_transfusion.launch`` (torchrun) running the trainer, as
    launch/pretrain_local.sh starts it."""
    command = [
        sys.executable,
        "-m",
        "megatron_transfusion.launch",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_transfusion.train",
        "--config",
        "tiny",
        *map(str, args),
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_user_mistake_under_the_launcher_is_one_line_and_exit_2(data_root, tmp_path):
    """Both workers refuse the data; torchrun's ChildFailedError report and its log lines
    stay out, and the two workers' identical lines are printed once."""
    other = other_tokenizer_copy(data_root, tmp_path)
    process = launched(2, *overrides(data_root, tmp_path, 2, f"data.sources.0.path={other}"))
    out, err = process.communicate(timeout=600)
    assert process.returncode == 2, out[-2000:] + err[-4000:]
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: ")
        and "tokenized with another tokenizer" in errors[0]
    ), err
    assert err.strip().splitlines()[-1] == errors[0]


def wait_for_steps(process, run_root, steps=2):
    metrics = run_root / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)


def test_ctrl_c_under_the_launcher_saves_and_ends_in_one_line(data_root, tmp_path):
    """Ctrl-C reaches torchrun alone (its workers run in sessions of their own); it passes
    SIGINT on, the worker saves and exits, and the launcher says so in one line (exit 130)
    instead of torchrun's SignalException traceback."""
    process = launched(1, *overrides(data_root, tmp_path, 1000, "checkpoint.interval=1000"))
    wait_for_steps(process, tmp_path)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, out[-2000:] + err[-4000:]
    assert "stop requested: saved step" in out and "Traceback" not in err, err[-4000:]
    assert (
        err.strip().splitlines()[-1] == "stopped by SIGINT (torchrun passed it on to the workers)"
    )
    assert (tmp_path / "tiny" / "checkpoints" / "latest").exists()


def test_ctrl_c_twice_under_the_launcher_exits_without_saving(data_root, tmp_path):
    """torchrun answers a second Ctrl-C by stopping its workers with SIGTERM; after a
    Ctrl-C the trainer takes that as "now" too. Steps of ~1 s leave time to press twice."""
    process = launched(
        1,
        *overrides(
            data_root, tmp_path, 1000, "checkpoint.interval=1000", "data.global_batch_tokens=4096"
        ),
    )
    wait_for_steps(process, tmp_path)
    process.send_signal(signal.SIGINT)
    seen = []
    while not (seen and seen[-1].startswith("interrupted: saving")):
        line = process.stderr.readline()
        assert line, "".join(seen)[-4000:]
        seen.append(line)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, out[-2000:] + err[-4000:]
    assert "stop requested" not in out and "Traceback" not in err, err[-4000:]
    assert not (tmp_path / "tiny" / "checkpoints" / "latest").exists()


def test_a_worker_stopped_directly_ends_the_launcher_with_3(data_root, tmp_path):
    """SIGTERM to the worker itself (a Slurm time limit signals every process of the step):
    it saves and exits 3, and so does the launcher, without torchrun's report."""
    process = launched(1, *overrides(data_root, tmp_path, 1000, "checkpoint.interval=1000"))
    wait_for_steps(process, tmp_path)
    (worker,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    os.kill(int(worker), signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 3, out[-2000:] + err[-4000:]
    assert (
        "stop requested: saved step" in out
        and "Traceback" not in err
        and "ChildFailedError" not in err
    ), err


# ---- Config files ---------------------------------------------------------------------------


def test_fuzzed_config_files_are_config_errors(tmp_path):
    rng = random.Random(14)
    tiny = (ROOT / "megatron_transfusion" / "configs" / "tiny.yaml").read_bytes()
    path = tmp_path / "fuzzed.yaml"
    for _ in range(200):
        for data in mutations(tiny, rng).values():
            path.write_bytes(data)
            try:
                load_config(str(path))
            except ConfigError as e:
                assert "\n" not in str(e), e
            # else: the damage left a valid config


# ---- Data inputs ------------------------------------------------------------------------------

HOSTILE_LINES = [  # each a counted rejection, not the end of the job
    b"[" * 100_000,  # deeper than the interpreter's recursion limit
    b'{"text": ' + b"1" * 5000 + b"}",  # an integer the json module refuses to convert
    b'{"text": "a lone \\ud800 surrogate"}',  # no UTF-8 text for the tokenizer
]


def data_inputs() -> dict[str, tuple[str, bytes]]:
    """One small valid input of each kind ``mtf-prepare-data shard`` reads (a tar also
    gzip-compressed, as tarfile opens it) -> (kind, file contents)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.data_fixtures import add_member, png_bytes

    rng = np.random.default_rng(14)
    images = [png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for i, image in enumerate(images):
            add_member(archive, f"{i}.png", image)
            add_member(
                archive,
                f"{i}.json" if i % 2 else f"{i}.txt",
                json.dumps({"caption": "a red circle"}).encode() if i % 2 else b"a blue square",
            )

    def parquet(table) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.table(table), buffer)
        return buffer.getvalue()

    documents = ["the quick brown fox", "jumps over the lazy dog", "a red circle on the left"]
    return {
        "tar": ("image_caption", tar.getvalue()),
        "gz.tar": ("image_caption", gzip.compress(tar.getvalue(), mtime=0)),
        "img.parquet": (
            "image_caption",
            parquet({"image": images, "caption": ["a red circle"] * 3}),
        ),
        "jsonl": (
            "text",
            b"".join(json.dumps({"text": d}).encode() + b"\n" for d in documents)
            + b"\n".join(HOSTILE_LINES)
            + b"\n",
        ),
        "text.parquet": ("text", parquet({"text": documents})),
    }


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from data_prep.tokenizer import train_bpe
    from data_prep.vae import ConvVAE, VAEConfig, save_vae

    root = tmp_path_factory.mktemp("fuzz-encoders")
    train_bpe(
        ["the quick brown fox jumps over the lazy dog", "a red circle", "a blue square"],
        300,
        root / "tok.json",
    )
    torch.manual_seed(0)
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, root / "vae")
    return root


@contextlib.contextmanager
def deadline(seconds: int):
    """A hang fails the test instead of stalling the suite."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def prepare_data(*argv) -> str | None:
    """``mtf-prepare-data`` in this process: None if it succeeded, else its error line."""
    from data_prep.shard import main

    try:
        with deadline(60):
            main([str(a) for a in argv])
    except SystemExit as e:
        assert isinstance(e.code, str) and e.code.startswith("error: ") and "\n" not in e.code, (
            e.code
        )
        return e.code
    return None


def shard_and_merge(name: str, kind: str, data: bytes, encoders, out_root) -> dict | None:
    """Shard one input and merge it; each step succeeds or stops with one error line naming
    the input, and leaves no unit that looks finished but is not. Returns the counts of a
    dataset that was made, None where none was."""
    from megatron_transfusion.data import PreparedDataset

    source = out_root / f"in.{name}"
    source.write_bytes(data)
    out = out_root / "out"
    error = prepare_data(
        "shard",
        "--kind",
        kind,
        "--inputs",
        source,
        "--out",
        out,
        "--tokenizer",
        encoders / "tok.json",
        "--vae",
        encoders / "vae",
        "--image-size",
        16,
    )
    assert error is None or str(source) in error, error
    for unit in out.glob("unit-*"):  # renamed into place only when complete
        assert {"stats.json", "index.json", "lengths.npy", "rejected.jsonl"} <= {
            f.name for f in unit.iterdir()
        }
    merge_error = prepare_data("merge", "--out", out)
    if error or merge_error:
        assert error and merge_error and not (out / "manifest.json").exists(), (error, merge_error)
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        len(PreparedDataset(str(out))) == manifest["num_samples"] == manifest["counts"]["written"]
    )
    return manifest["counts"]


def test_undamaged_inputs_shard_whole_and_hostile_lines_are_rejections(encoders, tmp_path):
    for name, (kind, data) in data_inputs().items():
        (tmp_path / name).mkdir()
        counts = shard_and_merge(name, kind, data, encoders, tmp_path / name)
        rejected = {k: v for k, v in counts.items() if k.startswith("rejected_")}
        assert counts["written"] == 3, (name, counts)
        assert rejected == (
            {"rejected_bad_json": 2, "rejected_not_utf8": 1} if name == "jsonl" else {}
        ), name


@pytest.mark.parametrize("trials", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_fuzzed_data_inputs_are_counted_or_one_line_errors(encoders, tmp_path, trials):
    """Flips, truncations and noise in tars, Parquet and JSONL: ``mtf-prepare-data shard``
    and ``merge`` finish with what was readable counted, or stop with one line naming the
    input; never a traceback, a hang, or a half-written unit taken as finished. The VAE's
    reader (``mtf-train-vae --inputs``) returns images and rejections, or a ValueError."""
    from data_prep.vae import read_image_set

    rng, inputs = random.Random(14), data_inputs()
    for trial in range(trials):
        for name, (kind, data) in inputs.items():
            for damage, damaged in mutations(data, rng).items():
                case = tmp_path / f"{trial}-{name}-{damage}"
                case.mkdir()
                shard_and_merge(name, kind, damaged, encoders, case)
                if kind == "image_caption":
                    try:
                        with deadline(60):
                            read_image_set([str(case / f"in.{name}")], 16)
                    except ValueError as e:
                        assert "\n" not in str(e), e


# ---- Generation edges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "--batch-size 0: must be ≥ 1"),
        ("--guidance", "-1", "--guidance -1.0: must be ≥ 0"),
        ("--steps", "0", "--steps 0: must be ≥ 1"),
        ("--top-p", "0", "--top-p 0.0: must lie in (0, 1]"),
    ],
)
def test_generate_refuses_meaningless_flags(tmp_path, capsys, flag, value, message):
    from megatron_transfusion.inference.cli import generate_main

    with pytest.raises(SystemExit) as info:
        generate_main([str(tmp_path), "--prompt", "x", flag, value])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def exported_file(path):
    """What ``mtf-checkpoint export`` writes, for a model of one tensor."""
    save_export({"weight": torch.zeros(2, 3)}, path, {"step": "7", "config": "{}"})
    return path


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_a_flipped_byte_in_an_export_is_refused_unless_told_not_to_verify(tmp_path, capsys, where):
    from checkpoints.contents import inspect
    from megatron_transfusion.inference.cli import generate_main

    path = exported_file(tmp_path / "model.safetensors")
    data = bytearray(path.read_bytes())
    data[-1 if where == "tensor data" else data.index(b'"step":"7"') + 8] ^= (
        0x01  # a weight; step 7 -> 6
    )
    path.write_bytes(data)
    message = f"'{path}' does not match the SHA-256 in its metadata: it is damaged"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        inspect(path)
    assert inspect(path, verify=False)["tensors"] == {"weight": [2, 3]}
    with pytest.raises(SystemExit) as info:
        generate_main([str(path), "--prompt", "x"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and line.startswith(f"error: {message}") and "--no-verify" in line


def test_an_export_without_a_sha256_loads_with_a_warning(tmp_path, capsys):
    from checkpoints.contents import inspect

    path = tmp_path / "old.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, path, metadata={"step": "7", "config": "{}"})
    assert inspect(path)["trainer"]["step"] == 7
    assert f"warning: '{path}' has no sha256 in its metadata" in capsys.readouterr().err


def test_generate_refuses_a_truncated_export_by_name(tmp_path, capsys):
    from megatron_transfusion.inference.cli import generate_main

    path = exported_file(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SystemExit):
        generate_main([str(path), "--prompt", "x"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith(f"error: '{path}' is not a readable safetensors file")
        and "export the checkpoint again" in line
    )


@pytest.mark.parametrize("content", [b"hello, I am text", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_a_prompt_file_that_is_no_image_is_named(tmp_path, content):
    from megatron_transfusion.inference.cli import parse_prompt

    path = tmp_path / "picture.png"
    path.write_bytes(content)
    tokenizer = SimpleNamespace(special=SimpleNamespace(bos=1), encode=lambda text: [5])
    with pytest.raises(ValueError, match=re.escape(f"prompt image '{path}': undecodable image")):
        parse_prompt(f"<image:{path}>", tokenizer, None, 32, "text")
    with pytest.raises(
        ValueError, match=re.escape("has an image tag without a path: write <image:PATH>")
    ):
        parse_prompt("a cat <image:> please", tokenizer, None, 32, "text")


def test_fuzzed_prompts_files_are_clean_errors(tmp_path):
    from megatron_transfusion.inference.cli import read_prompts

    rng = random.Random(14)
    path = tmp_path / "prompts.txt"
    text = b"a red circle\nthe <image:photo.png> shows\n"
    for _ in range(50):
        for data in mutations(text, rng).values():
            path.write_bytes(data)
            try:
                read_prompts(SimpleNamespace(prompt=None, prompts_file=str(path)))
            except ValueError as e:
                assert str(path) in str(e)


def test_generation_cut_at_the_context_limit_says_so(trained_run, data_root, tmp_path):
    from data_prep.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(data_root / "tok.json")
    words = []
    while len(tokenizer.encode(" ".join(words))) < 118:  # of max_sequence_length 128
        words.append("circle")
    result = cli(
        GENERATE,
        trained_run / "tiny",
        "--mode",
        "text",
        "--prompt",
        " ".join(words),
        "--max-images",
        "0",
        "--max-new-tokens",
        "64",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "notice: prompt 0 stopped at the model's context limit (max_sequence_length=128) before "
        "--max-new-tokens 64" in result.stdout
    )


def test_inspect_reads_an_export_and_names_a_missing_path(tmp_path):
    from checkpoints.contents import inspect

    report = inspect(exported_file(tmp_path / "model.safetensors"))
    assert report["trainer"] == {"step": 7, "exported": True} and report["tensors"] == {
        "weight": [2, 3]
    }
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no such checkpoint: {tmp_path / 'nope'}")
    ):
        inspect(tmp_path / "nope")


def steps_logged(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_starting_over_sets_the_previous_run_aside_whole(data_root, tmp_path):
    """resume=none where a run is: the old run directory is kept, renamed, and the new run
    starts with empty logs and checkpoints (so nothing appends to the old files, and a
    crash before the first save cannot resume the old checkpoints)."""
    run(1, overrides(data_root, tmp_path, 4))
    output = run(1, ["--resume", "none", *overrides(data_root, tmp_path, 2)])
    (aside,) = tmp_path.glob("tiny.before-*")
    assert f"the previous run in {tmp_path / 'tiny'} was moved to {aside}" in output
    old, new = steps_logged(aside), steps_logged(tmp_path / "tiny")
    assert [s for s, _ in old] == [1, 2, 3, 4] and new == old[:2]  # from step 0 again
    checkpoints = {p.name for p in (aside / "checkpoints").glob("step_*")}
    assert checkpoints == {"step_00000002", "step_00000004"}
    assert [p.name for p in (tmp_path / "tiny" / "checkpoints").glob("step_*")] == [STEP]


def test_checkpoints_kept_elsewhere_load_and_refuse_starting_over_on_every_rank(
    data_root, tmp_path
):
    """checkpoint.directory outside the run directory (another filesystem, say): the run
    writes its checkpoints there with a copy of its config, so the tools read them alone.
    Holding checkpoints, it refuses resume=none, which would mix two runs there: both ranks
    refuse before building anything (no rank waits for the other) and the launcher prints
    the one line once."""
    elsewhere = tmp_path / "elsewhere"
    run(1, overrides(data_root, tmp_path, 2, f"checkpoint.directory={elsewhere}"))
    exported = tmp_path / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints.cli", "export", str(elsewhere), "--out", exported],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and exported.is_file(), result.stderr[-3000:]
    args = overrides(data_root, tmp_path, 2, f"checkpoint.directory={elsewhere}")
    process = launched(2, "--resume", "none", *args)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, out[-2000:] + err[-4000:]
    assert err.strip().splitlines()[-1] == (
        f"error: config field 'checkpoint.directory': {elsewhere} holds another run's "
        "checkpoints; resume=none would mix them: resume that run, or give an empty directory"
    )
    assert not list(tmp_path.glob("tiny.before-*"))
