"""The Flower ServerApp, for `flwr run .` and for `pocketfl simulate`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig, load_run_config
from pocketfl.strategies.device_clock import DeviceClock

from .federation import RoundCallback, run_federation


def build_server_app(
    config: RunConfig, on_round: RoundCallback | None = None, clock: DeviceClock | None = None
) -> ServerApp:
    """Return a ServerApp that runs `config`, ignoring Flower's run config.

    `clock` puts the rounds on simulated phone time (see pocketfl.simulations.clock).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, on_round, clock)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config from pyproject.toml (and --run-config overrides) and run it."""
    config = load_run_config(dict(context.run_config))
    run_federation(grid, config)
