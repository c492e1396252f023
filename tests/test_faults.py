"""Bad input and faults, for every entry script: one line on stderr naming the fix, exit
status 2, no traceback, and no folder left behind.

The battery is parametrised over ENTRY (every script a user runs); each script exposes
`build_parser()` and `main(argv)`. Cases that need a script's own semantics (resume after
Ctrl-C, NaN at the first iteration, benchmarks that find no runs) are in the script's tests.
"""
import importlib.util
import json
import os
import random

import pytest
import torch

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = ["train.py", "train_mcmc.py", "train_vi.py", "train_tilt.py"]
RESUMABLE = ["train.py", "train_mcmc.py", "train_vi.py"]  # train_tilt's runs are short
SHARED = TRAINING + ["sample_mcmc.py"]  # the flags of config.parser
ENTRY = SHARED + ["bench/fce.py", "bench/mcmc.py", "bench/mcmc_images.py", "bench/vi.py",
                  "bench/tilt.py", "bench/gather.py", "curves.py", "images/create_gif.py"]
# scripts not yet on the scaffold's conventions (one per line; remove a line when it passes)
PENDING = {
}
# arguments a script needs before anything else can be checked
BASE = {"sample_mcmc.py": ["--run", "no-such-run"], "bench/gather.py": ["runs"],
        "curves.py": ["runs"], "images/create_gif.py": ["images"]}


def load(script):
    if script in PENDING:
        pytest.skip(f"{script} is not on the scaffold yet")
    name = "entry_" + script.replace("/", "_")[:-3]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fails(script, argv, capsys, needle=None):
    """Run main(argv); assert exit status 2 with one line on stderr (containing `needle`)."""
    capsys.readouterr()
    try:
        code = load(script).main(list(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{script} {argv}: exit {code}, stderr {err!r}"
    assert err and "\n" not in err and "Traceback" not in err, f"{script} {argv}: {err!r}"
    if needle:
        assert needle.lower() in err.lower(), f"{script} {argv}: {err!r}"
    return err


@pytest.fixture
def clean_cwd(tmp_path, monkeypatch):
    """Run in an empty folder and check that a failed start leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    yield tmp_path
    left = set(os.listdir(tmp_path)) - before - {"inputs"}
    assert not left, f"a failed start left {sorted(left)}"


def write(tmp_path, name, content):
    os.makedirs(tmp_path / "inputs", exist_ok=True)
    path = tmp_path / "inputs" / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


# ----------------------------------------------------------------------------- every script
@pytest.mark.parametrize("script", ENTRY)
def test_unknown_flag(script, clean_cwd, capsys):
    fails(script, BASE.get(script, []) + ["--no_such_flag", "1"], capsys, "no_such_flag")


@pytest.mark.parametrize("script", ENTRY)
def test_every_parser_is_one_line(script):
    assert isinstance(load(script).build_parser(), config.Parser)


def _options(script, pred):
    parser = load(script).build_parser()
    return [a for a in parser._actions if a.option_strings and pred(a)]


@pytest.mark.parametrize("script", ENTRY)
def test_empty_lists_are_refused(script, clean_cwd, capsys):
    for a in _options(script, lambda a: a.nargs == "+"):
        fails(script, BASE.get(script, []) + [a.option_strings[0]], capsys)


@pytest.mark.parametrize("script", ENTRY)
@pytest.mark.parametrize("value", ["-1", str(2 ** 32), "1.5"])
def test_seeds_out_of_range(script, value, clean_cwd, capsys):
    for a in _options(script, lambda a: a.dest in ("seed", "seeds")):
        fails(script, BASE.get(script, []) + [a.option_strings[0], value], capsys, "seed")


@pytest.mark.parametrize("script", ENTRY)
def test_counts_must_be_positive(script, clean_cwd, capsys):
    """Every positive-integer flag (sizes, steps, repeats, jobs) refuses 0."""
    for a in _options(script, lambda a: a.type is config.positive_int):
        fails(script, BASE.get(script, []) + [a.option_strings[0], "0"], capsys)


# ----------------------------------------------------------------------------- shared flags
@pytest.mark.parametrize("script", SHARED)
@pytest.mark.parametrize("argv,needle", [
    (["--threads", "-1"], ">= 0"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:x"], "device"),
    (["--wandb", "sometimes"], "wandb"),
])
def test_shared_flags(script, argv, needle, clean_cwd, capsys):
    fails(script, BASE.get(script, []) + argv, capsys, needle)


@pytest.mark.parametrize("script", SHARED)
def test_unavailable_devices(script, clean_cwd, capsys):
    missing = [d for d, ok in (("cuda", torch.cuda.is_available()),
                               ("mps", torch.backends.mps.is_available())) if not ok]
    for device in missing:
        fails(script, BASE.get(script, []) + ["--device", device], capsys, "not available")


CONFIGS = [
    ({"seed": None}, "null"),
    ({"seed": [1, 2]}, "list"),
    ({"seed": True}, "seed"),
    ({"seed": "seven"}, "seed"),
    ({"wandb": 3}, "wandb"),
    ({"overwrite": "maybe"}, "true or false"),
    ({"threads": 2.5}, "threads"),
]


@pytest.mark.parametrize("script", SHARED)
@pytest.mark.parametrize("cfg,needle", CONFIGS, ids=[json.dumps(c) for c, _ in CONFIGS])
def test_config_values_are_type_checked(script, cfg, needle, clean_cwd, capsys):
    path = write(clean_cwd, "bad.json", json.dumps(cfg))
    fails(script, BASE.get(script, []) + ["--config", path], capsys, needle)


@pytest.mark.parametrize("script", SHARED)
def test_config_file_faults(script, clean_cwd, capsys):
    base = BASE.get(script, [])
    fails(script, base + ["--config", write(clean_cwd, "latin1.json", b'{"seed": "\xe9"}')],
          capsys, "UTF-8")
    fails(script, base + ["--config", write(clean_cwd, "broken.json", '{"seed": ')], capsys,
          "JSON")
    fails(script, base + ["--config", write(clean_cwd, "list.json", "[1, 2]")], capsys, "object")
    fails(script, base + ["--config", str(clean_cwd / "missing.json")], capsys, "not found")


@pytest.mark.parametrize("script", SHARED)
def test_boolean_words_in_config_files(script, clean_cwd):
    """A string "no" switches a boolean flag off, never on."""
    parser = load(script).build_parser()
    for word, value in (("no", False), ("false", False), ("yes", True), ("True", True)):
        path = write(clean_cwd, "flag.json", json.dumps({"overwrite": word}))
        assert config.parse(load(script).build_parser(), ["--config", path] + BASE.get(
            script, [])).overwrite is value
    assert parser is not None


# ----------------------------------------------------------------------------- checkpoints
def _checkpoint(path, **extra):
    torch.save({"config": {"seed": 1}, "step": 3, "script": "other.py", **extra}, path)
    return path


@pytest.mark.parametrize("script", RESUMABLE + ["sample_mcmc.py"])
def test_bad_checkpoints(script, clean_cwd, capsys):
    flag = "--run" if script == "sample_mcmc.py" else "--resume"
    inputs = clean_cwd / "inputs"
    os.makedirs(inputs, exist_ok=True)
    # fixed garbage: os.urandom's starts with pickle's PROTO byte one time in 256 (a warning)
    cases = {"empty": b"", "garbage": random.Random(0).randbytes(2000),
             "text": b"not a checkpoint\n"}
    for name, content in cases.items():
        run = inputs / name
        os.makedirs(run)
        (run / "checkpoint.pt").write_bytes(content)
        fails(script, [flag, str(run)], capsys, "checkpoint")
    full = _checkpoint(str(inputs / "full.pt"))
    data = open(full, "rb").read()
    os.makedirs(inputs / "truncated")
    (inputs / "truncated" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    fails(script, [flag, str(inputs / "truncated")], capsys, "not a readable checkpoint")
    os.makedirs(inputs / "foreign")
    _checkpoint(str(inputs / "foreign" / "checkpoint.pt"))
    fails(script, [flag, str(inputs / "foreign")], capsys, "other.py")
    if flag == "--resume":  # untagged (older) checkpoints: the entries the script reads
        os.makedirs(inputs / "untagged")
        torch.save({"config": {"seed": 1}}, inputs / "untagged" / "checkpoint.pt")
        fails(script, [flag, str(inputs / "untagged")], capsys, "start a new run")
    fails(script, [flag, str(inputs / "nowhere")], capsys, "no checkpoint")


def test_scripts_without_resume_refuse_it(clean_cwd, capsys):
    for script in sorted(set(TRAINING) - set(RESUMABLE)):
        fails(script, ["--resume", str(clean_cwd)], capsys, "has no --resume")


SIZE_FLAGS = {"train.py": "--samples", "train_mcmc.py": "--n_train", "train_vi.py": "--batch",
              "train_tilt.py": "--pool"}


@pytest.mark.parametrize("script", TRAINING)
def test_sizes_that_cannot_fit_in_memory(script, clean_cwd, capsys):
    fails(script, [SIZE_FLAGS[script], str(10 ** 13)], capsys, "memory")


# ----------------------------------------------------------------------------- folders
@pytest.mark.parametrize("script", TRAINING)
def test_unwritable_output_folder(script, clean_cwd, capsys):
    blocker = write(clean_cwd, "a-file", "x")
    fails(script, ["--out_dir", os.path.join(blocker, "run")], capsys, "a file")
    fails(script, ["--out_dir", "/proc/no-such/run"], capsys)


@pytest.mark.parametrize("script", TRAINING)
def test_used_output_folder_is_refused(script, clean_cwd, capsys):
    used = clean_cwd / "inputs" / "used"
    os.makedirs(used)
    (used / "config.json").write_text("{}")
    fails(script, ["--out_dir", str(used)], capsys, "--overwrite")
    assert os.listdir(used) == ["config.json"]


@pytest.mark.parametrize("script", RESUMABLE)
def test_used_image_folder_is_refused_without_offering_to_resume_it(script, clean_cwd, capsys):
    """A fresh run whose --image_dir holds another run's figures: one line naming --overwrite,
    and no `--resume <image folder>` (a figure folder is not a run to continue)."""
    used = clean_cwd / "inputs" / "figures"
    os.makedirs(used)
    (used / "old.png").write_bytes(b"x")
    err = fails(script, ["--out_dir", str(clean_cwd / "fresh"), "--image_dir", str(used)],
                capsys, "--overwrite")
    assert "--resume" not in err and os.listdir(used) == ["old.png"]


# ----------------------------------------------------------------------------- benchmarks
def test_bench_report_without_finished_runs_writes_nothing(tmp_path, capsys):
    out = tmp_path / "docs"
    os.makedirs(out)
    (out / "grid.png").write_bytes(b"the published figure")
    empty = tmp_path / "runs"
    os.makedirs(empty / "fce-maf-rings-s0")  # an unfinished run: no summary.json
    code = load("bench/fce.py").main(["--only", "report", "--root", str(empty), "--out", str(out)])
    assert code == 1 and "nothing written" in capsys.readouterr().err
    assert os.listdir(out) == ["grid.png"]
    assert (out / "grid.png").read_bytes() == b"the published figure"
    fails("bench/fce.py", ["--only", "report", "--root", str(tmp_path / "nowhere")], capsys,
          "does not exist")


def test_create_gif_faults(clean_cwd, capsys):
    frames = clean_cwd / "inputs" / "frames"
    os.makedirs(frames)
    fails("images/create_gif.py", [str(frames)], capsys, "no .png frames")
    fails("images/create_gif.py", [str(clean_cwd / "inputs" / "nowhere")], capsys, "not a folder")
    (frames / "epoch_0001.png").write_bytes(b"not an image")
    fails("images/create_gif.py", [str(frames)], capsys)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(frames / "epoch_0001.png")
    fails("images/create_gif.py", [str(frames), "--out", "/proc/no-such/x.gif"], capsys)
    fails("images/create_gif.py", [str(frames), "--fps", "0"], capsys, "positive")
