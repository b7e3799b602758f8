"""`lamina tune` end to end: bad input in one line, no Optuna at parse time, a study killed mid-trial
(SIGKILL) and run again completes with its stale trial retried once, and two processes sharing a study
through a real local PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from lamina.cli.main import main
from lamina.fields import read_yaml
from lamina.train.pretrain import RunConfig, prepare_data

RUN_YAML = """\
data: {{out: {data}, builtin: stdlib, max_bytes: 100K, train_tokenizer: 300, val_fraction: 0.1, num_workers: 0}}
model: {{preset: tiny, n_layers: 1, d_model: 32, n_heads: 2, max_seq_len: 32}}
train: {{batch_size: 4, seq_len: 32, max_steps: {steps}, eval_every: 5, eval_batches: 2, save_every: 100,
        log_every: 5, warmup_steps: 0, progress: false, seed: 0}}
search:
  train.lr: loguniform(1e-3, 1e-1)
"""


def _run_yaml(tmp: Path, steps: int = 6) -> Path:
    path = tmp / "run.yaml"
    path.write_text(RUN_YAML.format(data=tmp / "data", steps=steps))
    return path


def _tune(*args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "tune", *args]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", "train.lrr=loguniform(1e-4,3e-2)"], "did you mean 'train.lr'"),
        (["--search", "train.lr=loguniform(1e-4"], "is not a distribution"),
        (["--search", "train.lr=loguniform(3e-2,1e-4)"], "the bounds are the wrong way round"),
        (["--search", "model.n_layers=choice(2,x)"], "must be an integer"),
        (["--trials", "0"], "trials=0 must be positive"),
    ],
)
def test_bad_input_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["tune", "--config", str(_run_yaml(tmp_path)), "--out", str(tmp_path / "out"), *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lamina tune: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "data").exists()  # refused before the data is prepared


def test_print_config_shows_the_search_and_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tune", "--config", str(_run_yaml(tmp_path)), "--search", "model.n_layers=choice(1,2)",
            "--sampler", "grid", "--train.max_steps", "7", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tune"]["search"] == ["train.lr=loguniform(1e-3, 1e-1)", "model.n_layers=choice(1,2)"]
    assert printed["tune"]["sampler"] == "grid" and printed["train"]["max_steps"] == "7"


def test_the_core_and_help_do_not_import_optuna() -> None:
    code = (
        "import sys, contextlib, io\nfrom lamina.cli.main import main\n"
        "for argv in (['--help'], ['tune', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "import lamina, lamina.train.search\n"
        "print('optuna' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def _study(url: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=name, storage=url)


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_completes_the_study(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = _tune("--config", str(_run_yaml(tmp_path, steps=10)), "--sampler", "random", "--seed", "1",
                "--trials", "3", "--pruner", "none", "--heartbeat", "1", "--plots", "false", "--out", str(out))  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "trials" / "0001" / "run.yaml").exists():  # trial 1 is training
            assert proc.poll() is None and time.monotonic() < deadline, "trial 1 never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    url = f"sqlite:///{out / 'study.db'}"
    states = {t.number: t.state.name for t in _study(url, "out").trials}
    assert states == {0: "COMPLETE", 1: "RUNNING"}, states
    again = subprocess.run([*cmd, "--jobs", "2"], capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(url, "out").trials
    numbers = [t.number for t in trials]
    assert numbers == sorted(set(numbers))  # no duplicate trial numbers
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL")}
    assert len(by_state["COMPLETE"]) == 3 and [t.number for t in by_state["FAIL"]] == [1], again.stdout
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert retry.params == by_state["FAIL"][0].params and retry.state.name == "COMPLETE"
    assert f"retried as trial {retry.number}" in again.stdout
    # the second run's two processes split the cores between them; each trial's config records it
    cores = len(os.sched_getaffinity(0))
    later = [yaml.safe_load(t.user_attrs["config"]) for t in trials if t.number > 1]
    assert {c["train"]["threads"] for c in later} == {max(1, cores // 2)}
    assert (out / "best.yaml").is_file() and "best trial" in again.stdout


# -- a study shared through PostgreSQL -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[str]:
    """A local PostgreSQL server in a temporary data directory (trust auth, a free port), stopped after.
    PostgreSQL refuses to run as root: as root, the server runs as `nobody` through runuser."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not on PATH")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="lamina-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root)
            pytest.skip("running as root without runuser: PostgreSQL cannot run as root")
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = [runuser, "-u", "nobody", "--"]
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "lamina", "--auth=trust"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        yield f"postgresql+psycopg://lamina@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_a_study_through_postgresql(tmp_path: Path, postgres: str) -> None:
    run = _run_yaml(tmp_path)
    config = read_yaml(run)
    config.pop("search")
    prepare_data(RunConfig.from_dict(config), progress=False)  # the data first: both processes read it
    procs: list[subprocess.Popen[str]] = []
    try:
        for machine in ("a", "b"):
            cmd = _tune("--config", str(run), "--storage", postgres, "--study", "shared", "--trials", "4",
                        "--sampler", "random", "--pruner", "none", "--plots", "false", "--out", str(tmp_path / machine))  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(0.2)
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:  # a timeout or a failed start leaves no process running against the server
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    trials = _study(postgres, "shared").trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and 4 <= len(trials) <= 5  # at most one extra, at the end
    assert all(t.state.name == "COMPLETE" for t in trials)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert workers == {str(p.pid) for p in procs}  # both processes ran trials of the one study
    ran = {str(t.number) for t in trials}
    for stdout, _ in outputs:  # each process's table holds the union of the trials
        table = stdout.split("study 'shared'")[0].splitlines()
        rows = {line.split()[0] for line in table if line.split() and line.split()[1] == "complete"}
        assert rows == ran
