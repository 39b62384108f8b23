"""The apps on Flower's Deployment Engine: a SuperLink with TLS and SuperNode authentication,
SuperNodes on 127.0.0.1, runs submitted with `flwr run`.

The tests share one SuperLink and three SuperNodes and run in file order:
the last ones kill processes.
"""

import signal
import subprocess
import time

import pytest

from pocketfl.server.checkpoint import CHECKPOINT_FILE, load_checkpoint, model_digest
from pocketfl.server.config import load_run_config
from pocketfl.server.report import REPORT_FILE, read_report
from pocketfl.simulations.engine import simulate

from deployment_harness import VENV_BIN, Deployment

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists(), reason="flower-superlink is not installed next to Python"
)

# Tiny rounds: one local epoch, the default codecs. The ServerApp samples
# every SuperNode that is online, and the fixture waits until all are.
SETTINGS = {"local-epochs": 1, "seed": 0}
RUN_TIMEOUT = 420


def _run_config(output_dir, run_name, rounds, **extra):
    values = {**SETTINGS, "num-server-rounds": rounds, "run-name": run_name, "output-dir": str(output_dir), **extra}
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        deployment.start_superlink()
        for index, name in enumerate(["n1", "n2", "n3"]):
            deployment.register(name)
            # Simulation's partitions, so that the first test can compare
            # bytes with a simulation of the same config.
            state_dir = deployment.root / f"state-{name}"
            deployment.start_supernode(
                name,
                f'partition-id={index} num-partitions=3 state-dir="{state_dir}" '
                "device-idle=true device-charging=true device-unmetered=true",
            )
        deployment.wait_for_nodes(3)
        yield deployment
    finally:
        deployment.stop_all()


def _flwr_run(deployment, run_config, timeout=RUN_TIMEOUT):
    completed = subprocess.run(
        deployment.run_command(run_config),
        cwd=deployment.root,
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def test_three_rounds_match_simulation(deployment, tmp_path):
    _flwr_run(deployment, _run_config(tmp_path, "deployed", 3))
    deployed = read_report(tmp_path / "deployed" / REPORT_FILE)

    config = load_run_config(
        {**SETTINGS, "num-clients": 3, "num-server-rounds": 3, "run-name": "simulated", "output-dir": tmp_path}
    )
    simulated = simulate(config)

    assert deployed.summary is not None
    assert deployed.summary.completed_rounds == 3
    assert [record.round for record in deployed.rounds] == [1, 2, 3]
    assert [record.clients for record in deployed.rounds] == [3, 3, 3]
    # Same data, seeds and global model, so each client sends the same
    # payload bytes as its simulated twin. Replies arrive in another order,
    # but the weighted float64 sum of three float32 updates is exact.
    assert [r.uplink_bytes for r in deployed.rounds] == [r.uplink_bytes for r in simulated.rounds]
    assert [r.uplink_message_bytes for r in deployed.rounds] == [
        r.uplink_message_bytes for r in simulated.rounds
    ]
    assert [r.downlink_payload_bytes for r in deployed.rounds] == [
        r.downlink_payload_bytes for r in simulated.rounds
    ]
    assert [r.accuracy for r in deployed.rounds] == [r.accuracy for r in simulated.rounds]


def test_unregistered_key_rejected(deployment):
    rogue = deployment.start_supernode("rogue", "person-id=3", max_retries=1)
    try:
        returncode = rogue.process.wait(timeout=60)
    finally:
        rogue.stop()

    assert returncode != 0
    assert "Failed to activate SuperNode" in rogue.log()
    assert "No SuperNode found with the given public key" in deployment.superlink.log()


def test_plain_connection_to_tls_fails(deployment):
    plain = deployment.start_supernode("n4", "person-id=3", insecure=True, max_retries=1)
    try:
        returncode = plain.process.wait(timeout=60)
    finally:
        plain.stop()

    assert returncode != 0
    assert "Failed to initialize the connection to the SuperLink" in plain.log()


def _wait_for_checkpoint(run_dir, completed_rounds, process, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.process.poll() is None, process.log()[-4000:]
        if (run_dir / CHECKPOINT_FILE).exists():
            checkpoint = load_checkpoint(run_dir)
            if checkpoint.completed_rounds >= completed_rounds:
                return checkpoint
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint of round {completed_rounds} in {run_dir}:\n{process.log()[-4000:]}")


def test_server_killed_resumes(deployment, tmp_path):
    run_dir = tmp_path / "recovered"
    run_config = _run_config(tmp_path, "recovered", 4, resume=True)
    first = deployment.start("flwr-run-first", deployment.run_command(run_config))

    checkpoint = _wait_for_checkpoint(run_dir, 2, first)
    assert checkpoint.completed_rounds == 2, "round 3 ended before the test could kill the server"
    round_two_digest = model_digest(checkpoint.model)

    # The whole server side dies at once: SuperLink, SuperExec and ServerApp.
    deployment.superlink.kill(signal.SIGKILL)
    deployment.superlink.process.wait(timeout=30)
    first.stop()
    deployment.start_superlink()
    deployment.wait_for_nodes(3)

    resumed = _flwr_run(deployment, run_config)
    report = read_report(run_dir / REPORT_FILE)

    # flwr run streams the ServerApp's log, pocketfl's own lines included.
    streamed = resumed.stdout + resumed.stderr
    assert "resuming run recovered from round 3" in streamed, streamed[-4000:]
    assert "pocketfl: round 4: accuracy" in streamed, streamed[-4000:]
    assert [record.round for record in report.rounds] == [1, 2, 3, 4]
    assert len(report.resumes) == 1
    assert report.resumes[0].after_round == 2
    assert report.resumes[0].model_sha256 == round_two_digest
    assert report.summary.completed_rounds == 4
    assert load_checkpoint(run_dir).completed_rounds == 4


def test_killed_supernode_costs_one_report(deployment, tmp_path):
    deployment.register("n4")
    # Person 4 trains under seed 0; the node reads only its own recordings.
    extra = deployment.start_supernode("n4", "person-id=4")
    deployment.wait_for_nodes(4)
    run_dir = tmp_path / "node-lost"
    run = deployment.start(
        "flwr-run-node-lost", deployment.run_command(_run_config(tmp_path, "node-lost", 2))
    )
    try:
        _wait_for_checkpoint(run_dir, 1, run)
        extra.kill(signal.SIGKILL)
        run.process.wait(timeout=RUN_TIMEOUT)
    finally:
        extra.stop()
        run.stop()

    assert run.process.returncode == 0, run.log()[-4000:]
    report = read_report(run_dir / REPORT_FILE)
    assert [record.round for record in report.rounds] == [1, 2]
    assert report.rounds[0].clients == 4
    assert report.rounds[1].sampled_clients == 4
    assert report.rounds[1].clients == 3
    assert report.rounds[1].failed_clients == 1
