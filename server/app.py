"""The Flower ServerApp, for `flwr run .` and for `pocketfl simulate`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pocketfl.strategies.device_clock import DeviceClock
from pocketfl.tasks.base import TaskFactory, resolve_task

from .config import RunConfig, load_run_config
from .federation import RoundCallback, run_federation
from .log_stream import show_pocketfl_logs


def build_server_app(
    config: RunConfig,
    on_round: RoundCallback | None = None,
    task_factory: TaskFactory | None = None,
    clock: DeviceClock | None = None,
) -> ServerApp:
    """Return a ServerApp that runs `config`, ignoring Flower's run config.

    The task is `task_factory` when given, else the one `config.task` names.
    `clock` puts the rounds on simulated phone time (see pocketfl.simulations.clock).
    """
    task_factory = task_factory or resolve_task(config.task)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, task_factory, on_round, clock)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config from pyproject.toml (and --run-config overrides) and run it."""
    show_pocketfl_logs()
    config = load_run_config(dict(context.run_config))
    run_federation(grid, config, resolve_task(config.task))
