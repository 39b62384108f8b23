"""Run configuration: one pydantic model read from the CLI or Flower's run config."""

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pocketfl.compression import DEFAULT_DOWNLINK, DEFAULT_UPLINK, parse_compression_spec
from pocketfl.strategies.round_timer import target_reports
from pocketfl.tasks.base import BUILTIN_TASK, Task, TaskFactory, TaskSettings
from pocketfl.tasks.folders import ensure_writable_folder
from pocketfl.tasks.partitioning import parse_partitioning

# HAPT has 30 people; the server keeps some of them for central evaluation.
NUM_PEOPLE = 30

# Simulated phones in one run; each costs one Flower node context in memory.
MAX_CLIENTS = 10_000

# Flower's FedAvg samples at least this many phones per round, however small
# the fraction.
MIN_TRAIN_NODES = 1


def _kebab_case(name: str) -> str:
    return name.replace("_", "-")


def _is_numeric(annotation: Any) -> bool:
    # True for int, float and their optional forms such as `int | None`.
    types = get_args(annotation) or (annotation,)
    return any(kind in (int, float) for kind in types)


class RunConfig(BaseModel):
    """Settings of one federated run, validated at start-up.

    Keys use kebab case in Flower's run config and in the CLI
    (`num-server-rounds`, `--num-server-rounds`).
    """

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab_case,
        populate_by_name=True,
        frozen=True,
        allow_inf_nan=False,
    )

    run_name: str = Field(
        "har-default",
        min_length=1,
        max_length=64,
        description="Name of the run; results go to <output-dir>/<run-name>/.",
    )
    task: str = Field(
        "har",
        description="Task to train: 'har', or a Task class as 'package.module:ClassName'.",
    )
    num_server_rounds: int = Field(20, ge=1, le=1000, description="Federated rounds.")
    num_clients: int | None = Field(
        None,
        ge=2,
        le=MAX_CLIENTS,
        description=(
            "Simulated phones; default is the task's own (HAR: one per training person). "
            "More phones than people need a partitioning other than 'people'."
        ),
    )
    partitioning: str = Field(
        "people",
        description=(
            "How training examples are split over phones: 'people' (the task's own split, "
            "HAR: one person per phone), 'iid', 'dirichlet:ALPHA' (label skew) or "
            "'size:SIGMA' (size skew)."
        ),
    )
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of clients sampled each round."
    )
    compression: str = Field(
        DEFAULT_UPLINK,
        description=f"Uplink codec pipeline, for example {DEFAULT_UPLINK!r}, 'topk:0.01,q:8' or 'none'.",
    )
    downlink_compression: str = Field(
        DEFAULT_DOWNLINK,
        description=(
            f"Downlink codec pipeline for the global model, for example {DEFAULT_DOWNLINK!r} or 'q:8'; "
            "'none' sends the float32 model."
        ),
    )
    min_reports: int = Field(
        1,
        ge=1,
        le=100_000,
        description="Reports a round needs; a round with fewer fails and keeps the model.",
    )
    round_deadline: float | None = Field(
        None,
        gt=0,
        description=(
            "Simulated seconds after which a phone's report is late (simulations only); "
            "0 means no deadline."
        ),
    )
    over_selection: float = Field(
        1.0,
        ge=1.0,
        le=10.0,
        description="Phones sampled per report needed, with simulated phones (1.3 is common).",
    )
    error_feedback: bool = Field(
        True, description="Keep what the encoding drops and add it to the next update."
    )
    local_epochs: int = Field(2, ge=1, le=100, description="Local passes over the data per round.")
    learning_rate: float = Field(0.05, gt=0.0, le=10.0, description="Client SGD learning rate.")
    batch_size: int = Field(32, ge=1, le=4096, description="Client mini-batch size.")
    held_out_people: int = Field(
        6, ge=1, le=NUM_PEOPLE - 2, description="People kept for central evaluation."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for the split, model, codecs, client sampling and dropouts.")
    pruning: Literal["none", "global", "layer", "channel"] = Field(
        "none",
        description=(
            "Federated pruning: 'global' or 'layer' magnitude pruning, 'channel' removes whole "
            "channels (smaller exports), 'none' trains dense."
        ),
    )
    target_sparsity: float = Field(
        0.8, ge=0.0, lt=1.0, description="Share of pruned weights that the schedule reaches."
    )
    pruning_end_round: int | None = Field(
        None,
        ge=1,
        description="Round at which sparsity reaches the target; default three quarters of the rounds.",
    )
    qat: bool = Field(False, description="Quantization-aware (fake-quant int8) local training.")
    memory_limit_mb: float | None = Field(
        None,
        gt=0.0,
        description="Device memory for training; a client whose round needs more declines it.",
    )
    resume: bool = Field(
        False,
        description=(
            "Continue from the run folder's checkpoint, if there is one; "
            "false starts over and deletes it."
        ),
    )
    round_timeout: float = Field(
        3600.0,
        gt=0.0,
        le=86400.0,
        description="Seconds the server waits for the replies of one round before going on without the rest.",
    )
    output_dir: Path = Field(Path("runs"), description="Folder that receives run folders.")
    cache_dir: Path | None = Field(
        None, description="HAR cache folder; default POCKETFL_CACHE_DIR or ~/.cache/pocketfl."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _reject_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 and false as 0, and TOML and Flower's run config
        # carry real booleans, so `num-server-rounds = true` would run one round.
        # Integers stay valid for float fields.
        if isinstance(value, bool) and _is_numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("true and false are not numbers; give a number")
        return value

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(
                "must start with a letter or digit and contain only letters, digits, "
                "'.', '_' and '-', for example 'topk-1pct'"
            )
        return value

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: str) -> str:
        if value != BUILTIN_TASK and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(
                f"use '{BUILTIN_TASK}' or an import path such as 'mypackage.tasks:MyTask'"
            )
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_cache_dir_is_default(cls, value: Any) -> Any:
        # TOML has no null, so Flower's run config writes "no folder" as "".
        return None if value == "" else value

    @field_validator("round_deadline", mode="before")
    @classmethod
    def _zero_deadline_is_none(cls, value: Any) -> Any:
        # TOML has no null, so Flower's run config writes "no deadline" as 0.
        # False == 0 in Python, so booleans pass on to be rejected as numbers.
        if isinstance(value, bool):
            return value
        return None if value in (0, 0.0, "") else value

    @field_validator("partitioning")
    @classmethod
    def _check_partitioning(cls, value: str) -> str:
        return str(parse_partitioning(value))

    @field_validator("compression", "downlink_compression")
    @classmethod
    def _check_compression(cls, value: str) -> str:
        return str(parse_compression_spec(value))

    @property
    def resolved_pruning_end_round(self) -> int:
        """Round at which pruning reaches its target: the set one, or three quarters of the rounds."""
        return self.pruning_end_round or max(1, (3 * self.num_server_rounds) // 4)

    @property
    def run_dir(self) -> Path:
        """Folder that receives the report, the round CSV and the final model."""
        return self.output_dir / self.run_name

    @property
    def task_settings(self) -> TaskSettings:
        """Settings that build this run's task, as each phone builds it too."""
        return TaskSettings(
            seed=self.seed,
            cache_dir=self.cache_dir,
            held_out_people=self.held_out_people,
            partitioning=self.partitioning,
        )

    @property
    def num_train_people(self) -> int:
        """People that train as clients."""
        return NUM_PEOPLE - self.held_out_people

    @property
    def resolved_num_clients(self) -> int:
        """Clients in the federation: `num_clients`, or one per training person."""
        return self.num_clients or self.num_train_people


def describe_validation_error(
    error: ValidationError, option_names: dict[str, str] | None = None
) -> str:
    """Turn a pydantic error into one line per bad option: the option, the value, the range.

    `option_names` maps field names to the names the user typed, such as
    {"num_server_rounds": "--rounds"}; other fields are named in kebab case.
    """
    option_names = option_names or {}
    lines = []
    for item in error.errors():
        field_name = str(item["loc"][0]) if item["loc"] else ""
        field_name = field_name.replace("-", "_")
        option = option_names.get(field_name, _kebab_case(field_name) or "config")
        if item["type"] == "extra_forbidden":
            known = ", ".join(_kebab_case(name) for name in RunConfig.model_fields)
            lines.append(f"unknown option {option}; known options: {known}")
            continue

        message = item["msg"].removeprefix("Value error, ")
        line = f"invalid value {item.get('input')!r} for {option}: {message}"

        allowed = _allowed_range(field_name)
        if allowed:
            line += f" (allowed: {allowed})"
        lines.append(line)
    return "\n".join(lines)


def _allowed_range(field_name: str) -> str:
    field = RunConfig.model_fields.get(field_name)
    if field is None:
        return ""

    parts = []
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    for constraint in field.metadata:
        for key, symbol in symbols.items():
            bound = getattr(constraint, key, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return " and ".join(parts)


def load_run_config(
    values: dict[str, Any], option_names: dict[str, str] | None = None
) -> RunConfig:
    """Validate `values` (kebab or snake keys) into a RunConfig, or raise ValueError naming each problem."""
    try:
        config = RunConfig.model_validate(values)
    except ValidationError as error:
        raise ValueError(describe_validation_error(error, option_names)) from None

    # Other tasks check their own client count when they are built.
    if (
        config.task == BUILTIN_TASK
        and config.partitioning == "people"
        and config.resolved_num_clients > config.num_train_people
    ):
        option = (option_names or {}).get("num_clients", "num-clients")
        raise ValueError(
            f"invalid value {config.resolved_num_clients} for {option}: with "
            f"{config.held_out_people} held-out people there are only "
            f"{config.num_train_people} training people, so use at most "
            f"{config.num_train_people} clients, hold out fewer people, or split the "
            "windows over virtual phones with --partitioning iid, dirichlet:ALPHA or size:SIGMA."
        )
    if config.pruning_end_round is not None and config.pruning_end_round > config.num_server_rounds:
        option = (option_names or {}).get("pruning_end_round", "pruning-end-round")
        raise ValueError(
            f"invalid value {config.pruning_end_round} for {option}: pruning cannot end after the "
            f"last round ({config.num_server_rounds}); use at most {config.num_server_rounds}."
        )
    return config


def prepare_folders(config: RunConfig, option_names: dict[str, str] | None = None) -> None:
    """Create the run folder (and the cache folder, if set), or raise ValueError naming the option.

    Called at start-up so that a bad folder fails before any client trains.
    """
    option_names = option_names or {}
    folders = [("output_dir", config.run_dir)]
    if config.cache_dir is not None:
        folders.append(("cache_dir", config.cache_dir))

    for field_name, folder in folders:
        ensure_writable_folder(folder, option_names.get(field_name, _kebab_case(field_name)))


def build_task(config: RunConfig, task_factory: TaskFactory) -> Task:
    """Build the run's task on this machine, or raise ValueError naming the task and the failure."""
    try:
        return task_factory(config.task_settings)
    except Exception as error:  # a user's task may fail in any way; report it at start-up
        raise ValueError(f"task '{config.task}' failed to build: {type(error).__name__}: {error}") from None


def resolve_num_clients(
    config: RunConfig, task: Task, option_names: dict[str, str] | None = None
) -> int:
    """Return the run's number of phones: the config's, or the task's default; check the task's limit."""
    num_clients = config.num_clients or task.default_num_clients()
    limit = task.max_clients()
    if limit is not None and num_clients > limit:
        option = (option_names or {}).get("num_clients", "num-clients")
        raise ValueError(
            f"invalid value {num_clients} for {option}: task '{task.name}' can split its data "
            f"over at most {limit} phones; set {option} to at most {limit}"
        )
    return num_clients


def check_min_reports(
    config: RunConfig, num_clients: int, option_names: dict[str, str] | None = None
) -> None:
    """Raise ValueError if no round can get `min_reports` reports from `num_clients` phones.

    A round accepts at most FedAvg's sample size. Over-selection samples more
    phones, but the round closes once that many have reported.
    """
    max_reports = target_reports(num_clients, config.fraction_train, MIN_TRAIN_NODES)
    if config.min_reports <= max_reports:
        return

    option_names = option_names or {}
    option = option_names.get("min_reports", "min-reports")
    fraction_option = option_names.get("fraction_train", "fraction-train")
    clients_option = option_names.get("num_clients", "num-clients")
    raise ValueError(
        f"invalid value {config.min_reports} for {option}: a round takes at most {max_reports} "
        f"reports ({num_clients} clients, {fraction_option} {config.fraction_train}), so every "
        f"round would fail; use at most {max_reports}, or raise {clients_option} or {fraction_option}."
    )


def check_pruning(config: RunConfig, task: Task, option_names: dict[str, str] | None = None) -> None:
    """Raise ValueError if channel pruning is set for a task that names no channel chain."""
    if config.pruning == "channel" and not task.channel_chain():
        option = (option_names or {}).get("pruning", "pruning")
        raise ValueError(
            f"invalid value 'channel' for {option}: task '{task.name}' names no channel chain; "
            f"use {option} global or layer, or give the task a channel_chain()"
        )
