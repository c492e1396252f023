"""What a user types works: every benchmark as a file and as a module, and a 2D train.py run
imports only what it uses."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))
                    if "__main__" in open(p).read())
# modules of other tasks that a 2D train.py run must not pay for (memory, start-up time), and
# torch._dynamo (with sympy about 70 MB), which torch.optim imports and adam.Adam does not
NOT_ON_2D = ("ais", "annealing", "samplers", "image_data", "image_metrics", "imbalance", "tilt",
             "tilt_plots", "vi_flows", "torch._dynamo")


def python(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_every_benchmark_is_found():
    assert {"fce", "digits", "gather", "mcmc", "mcmc_images", "tilt", "vi"} <= set(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmark_runs_as_a_file(name):
    """`python bench/<name>.py` (repository root first on the path, not bench/, whose
    fce.py / tilt.py would shadow the modules of the same name)."""
    res = python(os.path.join("bench", f"{name}.py"), "--help")
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr


@pytest.mark.slow
def test_a_benchmark_runs_as_a_module_and_as_a_file_from_another_folder(tmp_path):
    res = python("-m", "bench.fce", "--help")
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr
    res = python(os.path.join(ROOT, "bench", "fce.py"), "--help", cwd=tmp_path)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr


@pytest.mark.slow
def test_a_2d_run_imports_none_of_the_image_modules(tmp_path):
    """train.py's 2D path (parse, data, models, one step, evaluation) leaves the modules of
    the other tasks unimported."""
    code = (
        "import sys, train\n"
        "argv = ['--samples', '400', '--batch', '200', '--test_samples', '400', '--epoch', '1',"
        " '--ebm_hidden', '8', '--flow_hidden', '8', '--flow_layers', '1', '--wandb', 'disabled',"
        f" '--out_dir', {str(tmp_path / 'run')!r}, '--image_dir', {str(tmp_path / 'img')!r}]\n"
        "assert train.main(argv) == 0\n"
        f"print(sorted(m for m in {NOT_ON_2D!r} if m in sys.modules))\n")
    res = python("-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_the_image_sets_named_in_tasks_are_those_image_data_knows():
    import image_data
    import tasks

    assert tasks.IMAGES == tuple(image_data.LEVELS) == image_data.IMAGE_DATASETS
