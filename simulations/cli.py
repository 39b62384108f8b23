"""The `pocketfl` command line: `simulate` runs the HAR federation, `compare` compares codecs on
simulated phones, `certs` and `node-keys` prepare deployment."""

import logging
import math
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pocketfl.compression import DEFAULT_DOWNLINK, DEFAULT_UPLINK
from pocketfl.server.config import (
    RunConfig,
    build_task,
    check_min_reports,
    check_pruning,
    ensure_writable_folder,
    load_run_config,
    prepare_folders,
    resolve_num_clients,
)
from pocketfl.server.credentials import PUBLIC_KEY_LIST_FILE, create_certificates, create_node_keys
from pocketfl.server.federation import MODEL_FILE
from pocketfl.server.report import REPORT_FILE, ROUNDS_FILE, Report, RoundRecord
from pocketfl.simulations.profiles import Population, resolve_population
from pocketfl.simulations.run_labels import BASELINE, run_label
from pocketfl.tasks.base import Task, TaskFactory, resolve_task

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning for phones.")
console = Console()

# Hour of the simulated day at which round 1 starts when --start-hour is not given.
DEFAULT_START_HOUR = 0.0

# CLI option of each RunConfig field, so that errors name what the user typed.
OPTION_NAMES = {name: "--" + name.replace("_", "-") for name in RunConfig.model_fields}
OPTION_NAMES.update(
    {
        "num_server_rounds": "--rounds",
        "num_clients": "--clients",
        "run_name": "--name",
        "downlink_compression": "--downlink",
    }
)


def _check_distinct_pipelines(specs: list[str]) -> None:
    # Each run writes to a folder named after its pipeline, so two pipelines
    # with one folder name would overwrite each other's results.
    seen = {run_label(BASELINE): BASELINE}
    for spec in specs:
        label = run_label(spec)
        if label in seen:
            raise ValueError(
                f"invalid value '{spec}' for --compression: its run folder '{label}' is also that of "
                f"'{seen[label]}' (the FedAvg baseline 'none' always runs); list each pipeline once, "
                "written differently enough to get its own folder"
            )
        seen[label] = spec


def _check_hour(value: float) -> float:
    # math.isfinite first: NaN passes every range comparison.
    if not (math.isfinite(value) and 0.0 <= value < 24.0):
        raise typer.BadParameter(f"invalid hour {value}: use a number from 0 to below 24, such as 8.5")
    return value


@cli.callback()
def _root() -> None:
    """pocketfl: federated learning with compressed updates, simulated on phones."""


@cli.command()
def simulate(
    task: Annotated[
        str, typer.Option(help="Task: 'har', or a Task class as 'package.module:ClassName'.")
    ] = "har",
    rounds: Annotated[int, typer.Option(help="Federated rounds (1 to 1000).")] = 20,
    clients: Annotated[
        int | None, typer.Option(help="Simulated phones; default one per training person.")
    ] = None,
    compression: Annotated[
        str, typer.Option(help="Uplink codec pipeline: 'lowrank:2,q:4', 'topk:0.01,q:8', 'q:4', 'none', ...")
    ] = DEFAULT_UPLINK,
    downlink: Annotated[
        str, typer.Option(help="Downlink codec pipeline for the global model: 'q:4', 'q:8', 'none', ...")
    ] = DEFAULT_DOWNLINK,
    error_feedback: Annotated[
        bool, typer.Option(help="Add what the encoding dropped to the next update.")
    ] = True,
    local_epochs: Annotated[int, typer.Option(help="Local passes over the data per round.")] = 2,
    learning_rate: Annotated[float, typer.Option(help="Client SGD learning rate, in (0, 10].")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Client mini-batch size, 1 to 4096.")] = 32,
    partitioning: Annotated[
        str,
        typer.Option(
            help=(
                "Split of the training windows over phones: 'people' (one person per phone), "
                "or virtual phones: 'iid', 'dirichlet:ALPHA' (label skew), 'size:SIGMA' (size skew)."
            )
        ),
    ] = "people",
    fraction_train: Annotated[
        float, typer.Option(help="Share of phones whose reports each round needs, in (0, 1].")
    ] = 1.0,
    held_out_people: Annotated[
        int, typer.Option(help="People kept for central evaluation.")
    ] = 6,
    seed: Annotated[int, typer.Option(help="Seed for the split, the model, the codecs, client sampling and (with --devices) dropouts.")] = 0,
    pruning: Annotated[
        str, typer.Option(help="Federated pruning: none, global, layer or channel.")
    ] = "none",
    target_sparsity: Annotated[
        float, typer.Option(help="Share of weights pruned by the end of the schedule, in [0, 1).")
    ] = 0.8,
    pruning_end_round: Annotated[
        int | None, typer.Option(help="Round at which pruning reaches the target; default 3/4 of the rounds.")
    ] = None,
    qat: Annotated[bool, typer.Option(help="Quantization-aware (int8 fake-quant) local training.")] = False,
    memory_limit_mb: Annotated[
        float | None, typer.Option(help="Device memory for training in MB; phones that need more decline.")
    ] = None,
    name: Annotated[str, typer.Option(help="Run name; results go to OUTPUT_DIR/NAME/.")] = "har-default",
    output_dir: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path("runs"),
    cache_dir: Annotated[
        Path | None, typer.Option(help="HAR cache folder (default: POCKETFL_CACHE_DIR or ~/.cache/pocketfl).")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help=(
                "Simulate phone hardware and links: 'default' (low- to high-end phones on "
                "cellular and Wi-Fi), 'cellular', or a TOML profile file. Rounds then run on "
                "a simulated clock. Default: no device simulation."
            )
        ),
    ] = None,
    round_deadline: Annotated[
        float | None,
        typer.Option(
            help="With --devices: simulated seconds after which a report is late; 0 means no deadline."
        ),
    ] = None,
    over_selection: Annotated[
        float, typer.Option(help="With --devices: phones sampled per report needed, 1 to 10.")
    ] = 1.0,
    min_reports: Annotated[
        int, typer.Option(help="Reports a round needs; a round with fewer fails and keeps the model.")
    ] = 1,
    start_hour: Annotated[
        float,
        typer.Option(
            help="With --devices: hour of the simulated day when round 1 starts, 0 to below 24.",
            callback=_check_hour,
        ),
    ] = DEFAULT_START_HOUR,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a federation across simulated phones (default: activity recognition) and write a report."""
    try:
        population = resolve_devices(devices)
        config = load_run_config(
            {
                "task": task,
                "num_server_rounds": rounds,
                "num_clients": clients,
                "compression": compression,
                "downlink_compression": downlink,
                "error_feedback": error_feedback,
                "local_epochs": local_epochs,
                "learning_rate": learning_rate,
                "batch_size": batch_size,
                "fraction_train": fraction_train,
                "partitioning": partitioning,
                "held_out_people": held_out_people,
                "seed": seed,
                "pruning": pruning,
                "target_sparsity": target_sparsity,
                "pruning_end_round": pruning_end_round,
                "qat": qat,
                "memory_limit_mb": memory_limit_mb,
                "run_name": name,
                "output_dir": output_dir,
                "cache_dir": cache_dir,
                "round_deadline": round_deadline,
                "over_selection": over_selection,
                "min_reports": min_reports,
            },
            OPTION_NAMES,
        )
        _check_device_options(config, population, start_hour)
        task_factory = resolve_task(config.task)
        task, num_clients = _check_task(config, task_factory)
        replacing = (config.run_dir / REPORT_FILE).exists()
        prepare_folders(config, OPTION_NAMES)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(code=2) from None

    # Flower configures its logger when imported, so logging is set up after it.
    from pocketfl.simulations.engine import simulate as run_simulation

    _configure_logging(verbose)

    console.print(
        f"pocketfl: task '{config.task}', {num_clients} clients, {config.num_server_rounds} rounds, "
        f"compression '{config.compression}', error feedback {'on' if config.error_feedback else 'off'}, "
        f"downlink '{config.downlink_compression}'",
        highlight=False,
    )
    if replacing:
        console.print(f"replacing the results in {config.run_dir}; use --name to keep them", highlight=False)

    with Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        progress_task = progress.add_task("starting the Simulation Engine", total=config.num_server_rounds)

        def on_round(record: RoundRecord) -> None:
            progress.update(
                progress_task,
                completed=record.round,
                description=f"accuracy {record.accuracy:.3f}, uplink {record.uplink_bytes:,} B",
            )

        report = run_simulation(config, on_round, task_factory, population, start_hour)

    _print_summary(report, task.central_data_name)
    console.print(f"wrote {REPORT_FILE}, {ROUNDS_FILE} and {MODEL_FILE} in {config.run_dir}", highlight=False)


@cli.command()
def compare(
    compression: Annotated[
        list[str],
        typer.Option(help="Uplink pipeline to compare with FedAvg; repeat for several."),
    ] = [DEFAULT_UPLINK],  # noqa: B006 - typer reads list defaults
    downlink: Annotated[
        str, typer.Option(help="Downlink pipeline of the compressed runs (FedAvg sends float32).")
    ] = DEFAULT_DOWNLINK,
    devices: Annotated[
        str,
        typer.Option(help="Phone population: 'default', 'cellular' or a TOML profile file."),
    ] = "default",
    target_accuracy: Annotated[
        float,
        typer.Option(help="Central accuracy (HAR: on the held-out people) whose time to reach is compared, in (0, 1]."),
    ] = 0.85,
    rounds: Annotated[int, typer.Option(help="Federated rounds per run (1 to 1000).")] = 20,
    clients: Annotated[
        int | None, typer.Option(help="Simulated phones; default one per training person.")
    ] = None,
    partitioning: Annotated[
        str, typer.Option(help="'people', 'iid', 'dirichlet:ALPHA' or 'size:SIGMA'.")
    ] = "people",
    fraction_train: Annotated[
        float, typer.Option(help="Share of phones whose reports each round needs, in (0, 1].")
    ] = 1.0,
    over_selection: Annotated[float, typer.Option(help="Phones sampled per report needed, 1 to 10.")] = 1.0,
    round_deadline: Annotated[
        float | None,
        typer.Option(help="Simulated seconds after which a report is late; 0 means no deadline."),
    ] = None,
    min_reports: Annotated[int, typer.Option(help="Reports a round needs to count.")] = 1,
    local_epochs: Annotated[int, typer.Option(help="Local passes over the data per round.")] = 2,
    learning_rate: Annotated[float, typer.Option(help="Client SGD learning rate, in (0, 10].")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Client mini-batch size, 1 to 4096.")] = 32,
    start_hour: Annotated[
        float, typer.Option(help="Hour of the simulated day at round 1, 0 to below 24.", callback=_check_hour)
    ] = DEFAULT_START_HOUR,
    seed: Annotated[int, typer.Option(help="Seed shared by every run.")] = 0,
    name: Annotated[str, typer.Option(help="Comparison name; results go to OUTPUT_DIR/NAME/.")] = "compare",
    output_dir: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path("runs"),
    cache_dir: Annotated[Path | None, typer.Option(help="HAR cache folder.")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run uncompressed FedAvg and compression pipelines on the same phones; write a table and plots."""
    try:
        population = resolve_devices(devices)
        if not 0.0 < target_accuracy <= 1.0:
            raise ValueError(f"invalid value {target_accuracy} for --target-accuracy: use a value in (0, 1]")
        base = load_run_config(
            {
                "num_server_rounds": rounds,
                "num_clients": clients,
                "partitioning": partitioning,
                "downlink_compression": downlink,
                "fraction_train": fraction_train,
                "over_selection": over_selection,
                "round_deadline": round_deadline,
                "min_reports": min_reports,
                "local_epochs": local_epochs,
                "learning_rate": learning_rate,
                "batch_size": batch_size,
                "seed": seed,
                "run_name": name,
                "output_dir": output_dir,
                "cache_dir": cache_dir,
            },
            OPTION_NAMES,
        )
        specs = [load_run_config({"compression": pipeline}, OPTION_NAMES).compression for pipeline in compression]
        _check_distinct_pipelines(specs)
        task, _ = _check_task(base, resolve_task(base.task))
        prepare_folders(base, OPTION_NAMES)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(code=2) from None

    # Flower configures its logger when imported, so logging is set up after it.
    from pocketfl.simulations.compare import PLOT_FILES, TABLE_FILE, markdown_table
    from pocketfl.simulations.compare import compare as run_comparison

    _configure_logging(verbose)
    runs = run_comparison(
        base,
        compression,
        population,
        target_accuracy,
        start_hour,
        on_start=lambda label: console.print(f"running {label}", highlight=False),
    )
    console.print(
        markdown_table(runs, target_accuracy, task.central_data_name),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"wrote {TABLE_FILE}, {', '.join(PLOT_FILES.values())} and one folder per run in {base.run_dir}",
        highlight=False,
    )


@cli.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished run, e.g. runs/har-default.")],
    output_dir: Annotated[
        Path | None, typer.Option(help="Folder for the exported files; default RUN_DIR.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="HAR cache folder (default: the run's, or POCKETFL_CACHE_DIR).")
    ] = None,
) -> None:
    """Export a run's final model to ExecuTorch (.pte) and ONNX files for phone apps."""
    from pocketfl.server.export import export_run
    from pocketfl.simulations.export_table import print_export_table

    _configure_logging(False)
    try:
        exported = export_run(run_dir, output_dir, cache_dir)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(code=2) from None
    print_export_table(console, exported)
    console.print(f"wrote {len(exported)} files in {output_dir or run_dir}", highlight=False)


@cli.command()
def certs(
    host: Annotated[str, typer.Option(help="Host name or IP address that SuperNodes dial.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the CA and server files.")] = Path("certificates"),
    extra_host: Annotated[
        list[str] | None, typer.Option(help="Another name or IP of the same host; repeat as needed.")
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[
        bool, typer.Option(help="Replace existing CA and server files; SuperNodes using the old ca.crt stop connecting.")
    ] = False,
) -> None:
    """Create a CA and a SuperLink TLS certificate and key for HOST."""
    try:
        files = create_certificates(out_dir, host, tuple(extra_host or ()), days, force)
    except (ValueError, OSError) as error:
        raise _usage_error(error) from None
    console.print(
        f"wrote {files.ca_certificate} (give it to every SuperNode), {files.server_certificate}, "
        f"and the private keys {files.server_key} and {files.ca_key} (mode 0600)",
        highlight=False,
    )


@cli.command("node-keys")
def node_keys(
    names: Annotated[
        list[str],
        typer.Argument(help="One name per SuperNode, for example phone-1.", metavar="NAMES..."),
    ],
    out_dir: Annotated[Path, typer.Option(help="Folder for the key pairs.")] = Path("node-keys"),
    force: Annotated[
        bool, typer.Option(help="Replace existing key pairs of these names; re-register their public keys.")
    ] = False,
) -> None:
    """Create SuperNode authentication key pairs and the list of public keys to register.

    NAMES: one name per SuperNode, for example phone-1 phone-2, made of letters,
    digits, '.', '_' and '-'. Each NAME gets the private key file NAME (mode 0600,
    for that device only) and the public key file NAME.pub (to register).
    """
    # Typer 0.20 with click 8.5 drops an argument's help text, so the docstring describes NAMES.
    try:
        created = create_node_keys(out_dir, names, force)
    except (ValueError, OSError) as error:
        raise _usage_error(error) from None
    pairs = "key pair" if len(created) == 1 else "key pairs"
    console.print(
        f"wrote {len(created)} {pairs} in {out_dir} (private keys mode 0600) and {PUBLIC_KEY_LIST_FILE}; "
        "register each public key with `flwr supernode register KEY.pub SUPERLINK`",
        highlight=False,
    )


def _usage_error(error: Exception) -> typer.Exit:
    console.print(f"error: {error}", style="red", highlight=False)
    return typer.Exit(code=2)


def resolve_devices(devices: str | None) -> Population | None:
    """Return the population that --devices names, or None; raise ValueError naming the option."""
    if devices is None:
        return None
    try:
        return resolve_population(devices)
    except ValueError as error:
        raise ValueError(f"invalid value '{devices}' for --devices: {error}") from None


def _check_device_options(config: RunConfig, population: Population | None, start_hour: float) -> None:
    # These options act on the simulated clock only. Without --devices there
    # is no clock, so the run would ignore them. A value left at its default
    # changes nothing and passes (a deadline of 0 means no deadline).
    if population is not None:
        return

    changed = []
    if config.round_deadline is not None:
        changed.append((OPTION_NAMES["round_deadline"], config.round_deadline))
    if config.over_selection != RunConfig.model_fields["over_selection"].default:
        changed.append((OPTION_NAMES["over_selection"], config.over_selection))
    if start_hour != DEFAULT_START_HOUR:
        changed.append(("--start-hour", start_hour))
    if changed:
        option, value = changed[0]
        raise ValueError(
            f"invalid value {value:g} for {option}: it applies to simulated phones only and "
            "would be ignored; add --devices default (or --devices with a profile TOML file)"
        )


def _check_task(config: RunConfig, task_factory: TaskFactory) -> tuple[Task, int]:
    """Build the task, check the settings that depend on it, and return it with the number of clients."""
    # Building the task may read or write its data cache, so a bad folder fails first.
    if config.cache_dir is not None:
        ensure_writable_folder(config.cache_dir, OPTION_NAMES["cache_dir"])

    task = build_task(config, task_factory)
    num_clients = resolve_num_clients(config, task, OPTION_NAMES)
    check_min_reports(config, num_clients, OPTION_NAMES)
    check_pruning(config, task, OPTION_NAMES)
    return task, num_clients


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    # Flower's logger has a handler of its own; without this, each line would
    # print twice, once through it and once through the root handler. Without
    # --verbose it shows errors only, which hides its deprecation notice for
    # run_simulation (see simulations/engine.py). pocketfl's own warnings, such
    # as dropped replies, still show.
    flower_logger = logging.getLogger("flwr")
    flower_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    flower_logger.propagate = False


def _print_summary(report: Report, central_data_name: str) -> None:
    # Byte columns are in kB (1000 bytes) and the box is light so that the
    # table fits 80 columns. The float32 sizes are left to the report, which
    # contains exact byte counts; "ratio" is the uplink's.
    table = Table(title=f"run {report.run_name}", box=box.SIMPLE_HEAD, pad_edge=False)
    simulated = any(record.simulated_seconds > 0 for record in report.rounds)
    # With simulated phones, the loss and downlink ratio give way to the
    # simulated seconds and the dropped/late phones; the report has them all.
    columns = ["round", "accuracy", "loss", "clients", "up kB", "ratio", "down kB", "down ratio"]
    if simulated:
        columns = columns[:2] + columns[3:7] + ["sim s", "drop/late"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for record in report.rounds:
        downlink_ratio = None
        if record.downlink_payload_bytes:
            downlink_ratio = record.downlink_float32_bytes / record.downlink_payload_bytes
        cells = [
            str(record.round),
            f"{record.accuracy:.4f}" + (" failed" if record.failed else ""),
            f"{record.loss:.4f}",
            f"{record.clients}/{record.sampled_clients}",
            f"{record.uplink_bytes / 1000:,.1f}",
            _ratio_text(record.compression_ratio),
            f"{record.downlink_bytes / 1000:,.1f}",
            _ratio_text(downlink_ratio),
        ]
        if simulated:
            cells = cells[:2] + cells[3:7]
            cells += [f"{record.simulated_seconds:,.2f}", f"{record.dropped_clients}/{record.late_clients}"]
        table.add_row(*cells)
    console.print(table)

    summary = report.summary
    if summary is not None:
        console.print(
            f"final accuracy on {central_data_name} {summary.final_accuracy:.4f} "
            f"(best {summary.best_accuracy:.4f}, {summary.wall_seconds:.0f} s)\n"
            f"uplink {summary.total_uplink_bytes:,} bytes, float32 size / uplink size = "
            f"{_ratio_text(summary.uplink_compression_ratio)}\n"
            f"downlink {summary.total_downlink_bytes:,} bytes, float32 size / downlink payload size = "
            f"{_ratio_text(summary.downlink_compression_ratio)}",
            highlight=False,
        )
        if simulated:
            console.print(
                f"simulated phone time {summary.total_simulated_seconds:,.1f} s, "
                f"failed rounds {summary.failed_rounds}",
                highlight=False,
            )


def _ratio_text(ratio: float | None) -> str:
    # Three significant digits, so that an uncompressed run shows 0.998x, not 1.0x.
    return f"{ratio:.3g}x" if ratio else "-"


def main() -> None:
    """Entry point of the `pocketfl` script."""
    cli()
