"""Run a pocketfl federation on Flower's Simulation Engine (Ray backend)."""

import logging
import os

from flwr.simulation import run_simulation

from pocketfl.client.app import build_client_app
from pocketfl.server.app import build_server_app
from pocketfl.server.config import RunConfig, build_task, check_min_reports, check_pruning, resolve_num_clients
from pocketfl.server.federation import RoundCallback
from pocketfl.server.report import REPORT_FILE, Report, read_report
from pocketfl.tasks.base import TaskFactory, resolve_task

from .clock import PhoneClock
from .profiles import Population

logger = logging.getLogger(__name__)


def backend_config(num_cpus: int | None = None) -> dict:
    """Return the Ray backend settings: one CPU per simulated phone, no dashboard."""
    num_cpus = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }


def simulate(
    config: RunConfig,
    on_round: RoundCallback | None = None,
    task_factory: TaskFactory | None = None,
    population: Population | None = None,
    start_hour: float = 0.0,
) -> Report:
    """Run `config` with one simulated SuperNode per client and return the report.

    The task is `task_factory` when given, else the one `config.task` names.
    With a `population`, each node is a phone from it and rounds run on the
    simulated clock (deadline, dropouts, over-selection from `config`).
    """
    # Flower's telemetry would try the network, which simulations must not need.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Ray keeps CUDA_VISIBLE_DEVICES alone for num_gpus=0 with this set, which
    # is what it will do by default and what silences its FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    task_factory = task_factory or resolve_task(config.task)
    # Settings that no round could meet fail here, before Ray starts.
    task = build_task(config, task_factory)
    num_clients = resolve_num_clients(config, task)
    check_min_reports(config, num_clients)
    check_pruning(config, task)
    config = config.model_copy(update={"num_clients": num_clients})
    logger.info("simulating %d clients for %d rounds", num_clients, config.num_server_rounds)

    # NOTE: flwr 1.42 marks run_simulation as deprecated in favour of `flwr run`.
    # It is still the in-process entry to the same Simulation Engine, and the
    # only one that needs no SuperLink process and can report progress here.
    run_simulation(
        server_app=build_server_app(
            config, on_round, task_factory, phone_clock(config, population, start_hour)
        ),
        client_app=build_client_app(task_factory),
        num_supernodes=num_clients,
        backend_config=backend_config(),
    )
    return read_report(config.run_dir / REPORT_FILE)


def phone_clock(
    config: RunConfig, population: Population | None, start_hour: float = 0.0
) -> PhoneClock | None:
    """Return the simulated clock for `population`, or None to run without one."""
    if population is None:
        return None
    return PhoneClock(population, config.seed, config.local_epochs, start_hour=start_hour)
