"""Untrusted input on the command line: huge sizes in flags, state.json and
config.json, out-of-range flag values, config files of the wrong type or
size, unwritable destinations, malformed checkpoint and Hugging Face files,
weight files named outside the model directory, unbounded prompts and sample
counts. Each gets one line on stderr and exit 2, without allocating or
reading what it refuses; too many threads are capped with a warning, more cores
than the process may use are shared with a note, and the
sample at the end of a run fits a short context. One tiny run serves the
module."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from crystalline import _core, checkpoint, hf, load
from crystalline.config import ModelConfig, TrainConfig, load_toml
from crystalline.errors import UserError
from crystalline.guard import TEXT_LIMIT, read_text
from crystalline.inference import Sampling
from crystalline.plot import plot_losses
from crystalline.train import Trainer
from commandline import cli

TINY = ["--vocab-size", "300", "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--batch-size", "4",
        "--seq-len", "16", "--threads", "2", "--no-progress", "--sample-tokens", "0"]
CORPUS = "".join(f"def scale_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200))
HUGE = dict(n_embd=1_000_000, n_head=2)  # about 12 * 10**12 parameters: tens of TB
OVERFLOWING = dict(vocab_size=2**24, n_embd=2**40, n_head=2)  # more parameters than 64 bits count


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus, env) -> Path:
    run = tmp_path_factory.mktemp("run") / "tiny"
    r = cli(["train", str(corpus), *TINY, "--max-steps", "2", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, run_dir) -> Path:
    return hf.export(run_dir, tmp_path_factory.mktemp("hf") / "model")


def refused(args: list[str], env: dict, *messages: str, **kw) -> str:
    """Run the command; it must exit 2 with one line on stderr, `error: ...`
    holding each of `messages`."""
    r = cli(args, env, **kw)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.returncode, r.stderr)
    for message in messages:
        assert message in lines[0], (args, lines[0])
    return lines[0]


def edited_checkpoint(run_dir: Path, where: Path, edit) -> Path:
    """A copy of the run's latest checkpoint in a new run `where`, its
    state.json changed by `edit(state)`."""
    latest = checkpoint.resolve(run_dir)
    ckpt = shutil.copytree(latest, where / latest.name)
    state = json.loads((ckpt / checkpoint.STATE).read_text())
    edit(state)
    (ckpt / checkpoint.STATE).write_text(json.dumps(state))
    return ckpt


def edited_hf(hf_dir: Path, where: Path, config: object) -> Path:
    """A copy of the Hugging Face directory with `config` as its config.json."""
    out = shutil.copytree(hf_dir, where)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_huge_sizes_are_refused_with_the_figure_before_anything_is_allocated(corpus, run_dir, hf_dir, env,
                                                                              tmp_path):
    fresh_cache = dict(env, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    refused(["train", str(corpus), *TINY, "--embed-dim", "1000000", "--checkpoint-dir", str(tmp_path / "r")],
            fresh_cache, "training a model of", "needs", "GiB of memory is available", "--embed-dim")
    assert not (tmp_path / "xdg").exists()  # refused before preparing the data

    huge = edited_checkpoint(run_dir, tmp_path / "huge", lambda s: s["model"].update(HUGE))
    refused(["generate", str(huge), "--prompt", "x"], env, f"the model in {huge} needs", "GiB of memory is available")
    info = cli(["models", "info", str(huge)], env)  # describing a model allocates none of it
    count = ModelConfig(**{**json.loads((huge / checkpoint.STATE).read_text())["model"]}).num_parameters()
    assert info.returncode == 0 and f"{count:,}" in info.stdout, info.stderr
    listed = cli(["models", str(tmp_path)], env)
    assert listed.returncode == 0 and "C=1000000" in listed.stdout, listed.stderr

    overflowing = edited_checkpoint(run_dir, tmp_path / "overflowing", lambda s: s["model"].update(OVERFLOWING))
    refused(["models", "info", str(overflowing)], env, "more parameters than memory can address")

    config = json.loads((hf_dir / "config.json").read_text())
    big_hf = edited_hf(hf_dir, tmp_path / "big_hf", {**config, "n_embd": HUGE["n_embd"]})
    refused(["import", str(big_hf), "--out", str(tmp_path / "imported")], env, "importing the model", "needs")

    # found by fuzzing: sizes that overflowed the memory count, or made the tokenizer trainer reserve 141 GB
    sized = cli(["size", str(corpus), *TINY[:6], "--seq-len", str(10**17), "--no-progress"], env)
    assert sized.returncode == 2, sized.stderr
    assert sized.stderr.splitlines()[-1] == "error: the training memory of this shape overflows a 64-bit count"
    prepared = cli(["prepare", str(corpus), "--out", str(tmp_path / "ds"), "--vocab-size", str(2**31),
                    "--no-progress"], env)
    assert prepared.returncode == 0 and f"fewer than --vocab-size {2**31}" in prepared.stderr, prepared.stderr
    refused(["crawl", "http://127.0.0.1:9/", "--data-dir", str(tmp_path / "pages"), "--concurrency", str(10**30)], env,
            f"--concurrency must be at most 1024, not {10**30}")  # a worker task each: it ran out of memory


def test_seeds_sampling_settings_and_sizes_out_of_range_name_their_flag(corpus, run_dir, env, tmp_path):
    in_range = "must be an integer from 0 to 2**64 - 1, got "
    refused(["train", str(corpus), *TINY, "--checkpoint-dir", str(tmp_path / "r"), "--seed", "-1"], env,
            f"--seed {in_range}-1")
    refused(["generate", str(run_dir), "--prompt", "x", "--seed", str(2**64)], env, f"--seed {in_range}{2**64}")
    refused(["generate", str(run_dir), "--top-k", "1e23"], env, "'--top-k'")  # not an integer: typer's, one line
    refused(["crawl", "http://127.0.0.1:9/", "--data-dir", str(tmp_path / "pages"), "--user-agent", "bot-\u00fc"], env,
            "--user-agent must be printable ASCII, not 'bot-\u00fc'")  # found by fuzzing: httpx raised
    for settings, message in [(dict(seed=2**64), f"--seed {in_range}"), (dict(n_embd=2**70), "--embed-dim must be")]:
        with pytest.raises(UserError, match=re.escape(message)):
            TrainConfig(**settings).validate()
    for settings, message in [(dict(seed=-1), f"--seed {in_range}-1"), (dict(top_k=10**23), f"--top-k {in_range}"),
                              (dict(temperature=float("inf")), "--temperature"),
                              (dict(top_p=1e-50), "--top-p must be in (0, 1]")]:
        with pytest.raises(UserError, match=re.escape(message)):
            Sampling(**settings).validate()


def test_too_many_threads_are_capped_with_a_warning(corpus, run_dir, env, tmp_path):
    warning = "warning: --threads 100000 is more than 1024; using 1024"
    r = cli(["generate", str(run_dir), "--prompt", "x", "--max-tokens", "3", "--seed", "1", "--threads", "100000"], env)
    assert r.returncode == 0 and r.stderr == warning + "\n", r.stderr
    assert r.stdout.startswith("x")
    # training caps them first too (stopped here by a run directory below a file, before any work)
    said = io.StringIO()
    trainer = Trainer(TrainConfig(data=[str(corpus)], threads=100000, checkpoint_dir="/dev/null/x"),
                      Console(file=said))
    with pytest.raises(UserError, match="/dev/null is not a directory"):
        trainer.run()
    assert trainer.cfg.threads == 1024 and said.getvalue() == warning + "\n"


def test_more_cores_than_this_process_may_use_share_them_with_a_note(corpus, tmp_path):
    said = io.StringIO()
    cores = _core.available_cores() + 1
    run = Trainer(TrainConfig(data=[str(corpus)], vocab_size=300, n_embd=16, n_layer=1, n_head=2, batch_size=4,
                              seq_len=16, threads=2, cores=cores, max_steps=2, progress=False, sample_tokens=0,
                              checkpoint_dir=str(tmp_path / "r")), Console(file=said, width=400)).run()
    assert run.steps == 2
    assert f"note: --cores {cores} is more than the {cores - 1} this process may use" in said.getvalue()
    assert f"(Node Zero + 1 workers) on {cores} cores: 1 lanes, teams of {cores} cores" in said.getvalue()


def test_config_files_are_type_checked_and_bounded(corpus, env, tmp_path):
    train = ["train", str(corpus), *TINY, "--checkpoint-dir", str(tmp_path / "r"), "--config"]
    path = tmp_path / "bad.toml"
    path.write_text('learning_rate = "x"\n')
    refused([*train, str(path)], env, f"config file {path}: learning_rate must be a number, got 'x'")
    refused([*train, "/dev/zero"], env, "config file /dev/zero is not a regular file")
    for setting, message in [('max_steps = "5"', "max_steps must be an integer or null, got '5'"),
                             ("seed = 1.5", "seed must be an integer, got 1.5"),
                             ("extensions = [1]", "extensions must be a list of strings or null, got [1]"),
                             ("#" * (TEXT_LIMIT + 1), "is larger than 4 MiB")]:
        path.write_text(setting + "\n")
        with pytest.raises(UserError, match=re.escape(message)):
            load_toml(path)
    with pytest.raises(UserError, match="is not a regular file"):
        load_toml(tmp_path)


def test_unwritable_destinations_are_refused(corpus, run_dir, hf_dir, env, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    below_a_file = a_file / "x"
    refused(["export", str(run_dir), "--out", "/dev/null/x"], env,
            "--out /dev/null/x cannot be created: /dev/null is not a directory")
    refused(["import", str(hf_dir), "--out", str(below_a_file)], env,
            f"--out {below_a_file} cannot be created: {a_file} is not a directory")
    refused(["plot", str(run_dir), "--out", "/dev/null/x"], env, "cannot write --out /dev/null/x (Not a directory)")
    refused(["train", str(corpus), *TINY, "--checkpoint-dir", str(below_a_file)], env,
            f"--checkpoint-dir {below_a_file} cannot be created: {a_file} is not a directory")
    refused(["export", str(run_dir), "--out", str(a_file)], env, f"--out {a_file} is a file")
    with pytest.raises(UserError, match="not supported"):
        plot_losses(run_dir, tmp_path / "loss.nosuchformat")
    assert a_file.read_text() == "x"


def test_malformed_checkpoint_and_hugging_face_files_name_the_file_and_field(run_dir, hf_dir, env, tmp_path):
    no_files = edited_checkpoint(run_dir, tmp_path / "no_files", lambda s: s.update(files=[]))
    refused(["generate", str(no_files), "--prompt", "x"], env, f"{no_files / 'state.json'}: files must be a table")
    no_step = edited_checkpoint(run_dir, tmp_path / "no_step", lambda s: s.pop("optimizer_step"))
    refused(["train", "--resume", str(no_step.parent)], env, f"checkpoint file {no_step / 'state.json'}",
            "has no optimizer_step")
    for name, edit, message in [("bad_config", lambda s: s["config"].update(seed="x"), "config: seed must be an "
                                 "integer, got 'x'"), ("negative", lambda s: s.update(dealt=-1), "dealt must be an "
                                 "integer from 0"), ("empty", lambda s: s.clear(), "it has no config")]:
        with pytest.raises(UserError, match=re.escape(message)):
            checkpoint.read_state(edited_checkpoint(run_dir, tmp_path / name, edit))

    config = json.loads((hf_dir / "config.json").read_text())
    refused(["import", str(edited_hf(hf_dir, tmp_path / "listed", [config])), "--out", str(tmp_path / "o")], env,
            "is not a model config")
    with pytest.raises(UserError, match="layer_norm_epsilon must be a number, got '1e-5'"):
        hf.import_hf(edited_hf(hf_dir, tmp_path / "eps", {**config, "layer_norm_epsilon": "1e-5"}), tmp_path / "o")
    no_map = shutil.copytree(hf_dir, tmp_path / "no_map")
    (no_map / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    refused(["import", str(no_map), "--out", str(tmp_path / "o")], env, "has no weight_map")
    assert not (tmp_path / "o").exists()


def test_import_reads_no_weight_file_outside_the_model_directory(hf_dir, env, tmp_path):
    outside = shutil.copy(hf_dir / "model.safetensors", tmp_path / "outside.safetensors")  # a valid file
    sharded = shutil.copytree(hf_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "shard-1.safetensors")
    (sharded / "link.safetensors").symlink_to(outside)
    index = sharded / "model.safetensors.index.json"
    for name in ("../outside.safetensors", str(outside), "link.safetensors"):
        index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": name}}))
        if name.startswith(".."):
            refused(["import", str(sharded), "--out", str(tmp_path / "o")], env, f"{name!r} lies outside {sharded}")
        with pytest.raises(UserError, match=re.escape(f"{name!r} lies outside {sharded}")):
            hf.import_hf(sharded, tmp_path / "o")
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "shard-1.safetensors"}}))
    hf.import_hf(sharded, tmp_path / "o")  # the same weights, named inside, import


def test_prompts_and_sample_counts_are_bounded(run_dir, env, tmp_path):
    generate = ["generate", str(run_dir)]
    refused([*generate, "--prompt-file", "/dev/zero"], env, "--prompt-file /dev/zero is not a regular file")
    big = tmp_path / "big.txt"
    big.write_text("x" * (TEXT_LIMIT + 1))
    with pytest.raises(UserError, match="is larger than 4 MiB"):
        read_text(big, "--prompt-file")
    with open("/dev/zero", "rb") as zeros:
        refused(generate, env, "the prompt on standard input is larger than 4 MiB", stdin=zeros)
    refused([*generate, "--prompt", "x", "--num-samples", str(10**12)], env,
            "generating 1,000,000,000,000 sequences needs", "ask for fewer samples")
    # bytes that are not UTF-8 in an argument (found by fuzzing; chat's piped lines reach the same check)
    refused([*generate, "--prompt", "\udcff"], env, "error: the prompt is not UTF-8 text")
    with pytest.raises(UserError, match="the prompt is not UTF-8 text"):
        load(run_dir).encode_prompt("x\udcff")


def test_the_end_of_run_sample_fits_a_context_shorter_than_its_prompt(corpus, env, tmp_path):
    short = [*TINY, "--seq-len", "4", "--sample-tokens", "6"]
    r = cli(["train", str(corpus), *short, "--max-steps", "2", "--checkpoint-dir", str(tmp_path / "r")], env)
    assert r.returncode == 0, r.stderr
    assert "sample from the trained model" in r.stderr and r.stdout.strip()
