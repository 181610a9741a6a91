"""Job submission boundaries: the sbatch text submitit writes from our
config, Slurm state parsing, the requeue hook, signal handling of children."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from matrix_hpc.cluster import slurm as slurm_mod
from matrix_hpc.cluster.config import SlurmClusterConf, SlurmConf
from matrix_hpc.cluster.lifecycle import make_executor
from matrix_hpc.cluster.ray_node import ignore_preempt_signals
from matrix_hpc.cluster.slurm_run import DriverJob


@pytest.fixture(autouse=True)
def _render_without_srun(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's SlurmExecutor refuses to exist where ``srun`` is absent; rendering
    an sbatch script needs no Slurm, so these tests pretend it is there."""
    submitit_slurm = pytest.importorskip("submitit.slurm.slurm")
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))


def _sbatch_text(executor: Any) -> str:
    # submitit's own renderer of the sbatch script (no submission happens).
    return str(executor._executor._make_submission_file_text("python -m x", "uid"))


def test_sbatch_script_carries_slurm_settings(tmp_path: Path) -> None:
    conf = SlurmClusterConf(name="demo", dir=str(tmp_path), slurm=SlurmConf(
        partition="gpu", account="proj", qos="high", constraint="a100", exclusive=True,
        setup=["module load cuda"], additional_parameters={"reservation": "resv1"}))
    conf.worker.gpus_per_node, conf.worker.cpus_per_task, conf.worker.mem_gb = 4, 16, 64
    text = _sbatch_text(make_executor(conf, conf.worker, "matrix-worker-demo"))
    for line in ("--job-name=matrix-worker-demo", "--partition=gpu", "--account=proj", "--qos=high",
                 "--constraint=a100", "--exclusive", "--gpus-per-node=4", "--cpus-per-task=16", "--mem=64GB",
                 "--reservation=resv1", "module load cuda", f"--output {tmp_path}/logs/%j/%j_%t_log.out"):
        assert line in text, line


def test_run_job_uses_usr1_for_preemption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_hpc.cluster import slurm_run

    captured: dict[str, Any] = {}

    class FakeExecutor:  # boundary double: records what would be submitted
        def __init__(self, real: Any) -> None:
            self.real = real

        def update_parameters(self, **kw: Any) -> None:
            self.real.update_parameters(**kw)

        def submit(self, fn: Any) -> Any:
            captured["text"], captured["fn"] = _sbatch_text(self.real), fn
            raise RuntimeError("stop before sbatch")

    monkeypatch.setattr("matrix_hpc.cluster.lifecycle.make_executor",
                        lambda *a, **k: FakeExecutor(make_executor(*a, **k)))
    with pytest.raises(RuntimeError, match="stop before sbatch"):
        slurm_run.submit_run(["output.dir=o"], SlurmClusterConf(name="r", dir=str(tmp_path)), cwd="/w")
    assert "--signal=USR1@120" in captured["text"]
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in captured["text"]
    assert "--job-name=matrix-run-r" in captured["text"]
    assert captured["fn"].overrides == ["output.dir=o"] and captured["fn"].cwd == "/w"


def test_checkpoint_returns_fresh_picklable_copy() -> None:
    job = DriverJob(["a=1"], "/w", "/c", grace_s=5)
    job._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        delayed = job.checkpoint()  # the child ignores nothing here: USR1 kills it, like a failed drain
    finally:
        job._proc.kill()
    fresh = delayed.function
    assert fresh is not job and fresh.overrides == ["a=1"] and fresh._proc is None
    assert pickle.loads(pickle.dumps(job)).overrides == ["a=1"]  # the live process is never pickled


def test_children_started_with_preexec_survive_usr1_and_usr2() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             preexec_fn=ignore_preempt_signals)
    try:
        time.sleep(0.3)
        child.send_signal(signal.SIGUSR1)
        child.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_slurm_states_come_from_squeue_then_sacct(monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {"squeue": "5|RUNNING\n6_1|PENDING\n99|RUNNING\n", "sacct": "7|CANCELLED by 0\n8|COMPLETED\n"}

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, stdout=outputs[cmd[0]], stderr="")

    monkeypatch.setattr(slurm_mod.subprocess, "run", fake_run)
    states = slurm_mod.SlurmBackend().states(["5", "6_1", "7", "8", "9"])
    assert states == {"5": "RUNNING", "6_1": "PENDING", "7": "CANCELLED", "8": "COMPLETED", "9": "FINISHED"}


def test_importing_the_cluster_package_stays_light() -> None:
    code = ("import sys, matrix_hpc.cluster as c; c.SlurmClusterConf; "
            "print(sorted(m for m in ('ray', 'submitit', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_maybe_submit_run_runs_in_place_unless_slurm_outside_an_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from matrix_hpc.cluster.slurm_run import maybe_submit_run

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert maybe_submit_run(OmegaConf.create({"cluster": {"backend": "local"}})) is None
    assert maybe_submit_run(OmegaConf.create({"cluster": {"backend": "slurm", "submit_run": False}})) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # inside a job (the submitted run itself, a sweep job, salloc)
    assert maybe_submit_run(OmegaConf.create({"cluster": {"backend": "slurm"}})) is None
