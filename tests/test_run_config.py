import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, parse_config_args

from pocketfl.server.config import RunConfig, check_min_reports, load_run_config, resolve_num_clients
from pocketfl.server.federation import _warn_clock_settings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

NUMERIC_KEYS = [
    "num-server-rounds",
    "num-clients",
    "fraction-train",
    "min-reports",
    "round-deadline",
    "over-selection",
    "local-epochs",
    "learning-rate",
    "batch-size",
    "held-out-people",
    "seed",
    "target-sparsity",
    "pruning-end-round",
    "memory-limit-mb",
    "round-timeout",
]


def test_defaults_are_the_main_job():
    config = load_run_config({})
    assert config.num_server_rounds == 20
    assert config.compression == "lowrank:2,q:4"
    assert config.error_feedback is True
    assert config.resolved_num_clients == 24


def test_kebab_keys_from_flower_run_config():
    config = load_run_config({"num-server-rounds": 3, "compression": "none", "local-epochs": 1})
    assert config.num_server_rounds == 3
    assert config.compression == "none"
    assert config.local_epochs == 1


@pytest.mark.parametrize(
    ("values", "option", "allowed"),
    [
        ({"num_server_rounds": 0}, "num-server-rounds", ">= 1"),
        ({"num_server_rounds": -5}, "num-server-rounds", "<= 1000"),
        ({"num_server_rounds": "many"}, "num-server-rounds", ">= 1"),
        ({"learning_rate": -0.1}, "learning-rate", "> 0.0"),
        ({"fraction_train": 1.5}, "fraction-train", "<= 1.0"),
        ({"num_clients": 1}, "num-clients", ">= 2"),
        ({"batch_size": 0}, "batch-size", ">= 1"),
    ],
)
def test_out_of_range_option_names_option_and_range(values, option, allowed):
    with pytest.raises(ValueError) as raised:
        load_run_config(values)
    message = str(raised.value)
    assert f"for {option}:" in message
    assert allowed in message


def test_cli_option_names_used_in_message():
    with pytest.raises(ValueError, match="for --rounds:"):
        load_run_config({"num_server_rounds": 0}, {"num_server_rounds": "--rounds"})


@pytest.mark.parametrize("spec", ["topk:0", "topk:2", "q:0", "q:9", "zip", ""])
def test_invalid_compression_rejected(spec):
    with pytest.raises(ValueError, match="compression"):
        load_run_config({"compression": spec})


def test_more_clients_than_people_rejected():
    with pytest.raises(ValueError, match="at most 20 clients"):
        load_run_config({"num_clients": 25, "held_out_people": 10})


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_unsafe_run_name_rejected(name):
    with pytest.raises(ValueError, match="run-name"):
        load_run_config({"run_name": name})


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match="rounds"):
        load_run_config({"rounds": 3})


def test_run_dir_under_output_dir(tmp_path):
    config = RunConfig(output_dir=tmp_path, run_name="x1")
    assert config.run_dir == tmp_path / "x1"


@pytest.mark.parametrize(
    ("values", "num_clients", "max_reports"),
    [
        ({"min_reports": 11}, 10, 10),
        ({"min_reports": 3, "fraction_train": 0.25}, 10, 2),
        # Over-selection samples more phones, but a round closes at FedAvg's sample size.
        ({"min_reports": 3, "fraction_train": 0.25, "over_selection": 3.0}, 10, 2),
        # FedAvg samples at least one phone, however small the fraction.
        ({"min_reports": 2, "fraction_train": 0.01}, 10, 1),
    ],
)
def test_unreachable_min_reports_rejected(values, num_clients, max_reports):
    config = load_run_config(values)

    with pytest.raises(ValueError, match=f"for min-reports: a round takes at most {max_reports} reports"):
        check_min_reports(config, num_clients)
    check_min_reports(config.model_copy(update={"min_reports": max_reports}), num_clients)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [True, False])
def test_boolean_for_number_rejected(key, value):
    with pytest.raises(ValueError) as raised:
        load_run_config({key: value})

    message = str(raised.value)
    assert f"invalid value {value} for {key}:" in message
    assert "true and false are not numbers" in message


def test_numeric_keys_cover_every_number_field():
    numbers = (int, float, int | None, float | None)
    fields = {
        name.replace("_", "-") for name, field in RunConfig.model_fields.items() if field.annotation in numbers
    }

    assert fields == set(NUMERIC_KEYS)


def test_flower_run_config_boolean_rejected():
    # Flower parses --run-config values as TOML, so `true` arrives as a bool.
    overrides = parse_config_args(["num-server-rounds=true"])

    assert overrides == {"num-server-rounds": True}
    with pytest.raises(ValueError, match="for num-server-rounds: true and false are not numbers"):
        load_run_config(overrides)


def test_flower_run_config_types_accepted():
    overrides = parse_config_args(
        ["learning-rate=1 round-timeout=60 memory-limit-mb=512.5 round-deadline=0 qat=true run-name='x1'"]
    )

    config = load_run_config(overrides)

    assert config.learning_rate == 1.0
    assert config.round_timeout == 60.0
    assert config.memory_limit_mb == 512.5
    assert config.round_deadline is None
    assert config.qat is True
    assert config.run_name == "x1"


@pytest.mark.parametrize("num_supernodes", [2, 24])
def test_pyproject_run_config_passes_checks(num_supernodes):
    # Flower flattens [tool.flwr.app.config] the same way before the ServerApp reads it.
    # Its local federation starts 2 SuperNodes by default; 24 is one per training person.
    with PYPROJECT.open("rb") as stream:
        template = tomllib.load(stream)["tool"]["flwr"]["app"]["config"]

    config = load_run_config(flatten_dict(template))

    check_min_reports(config, num_supernodes)


def test_pyproject_codecs_match_defaults():
    # `flwr run` reads pyproject.toml and `pocketfl simulate` reads RunConfig's
    # defaults, so both must name the same uplink and downlink.
    with PYPROJECT.open("rb") as stream:
        template = tomllib.load(stream)["tool"]["flwr"]["app"]["config"]

    defaults = load_run_config({})
    assert template["compression"] == defaults.compression
    assert template["downlink-compression"] == defaults.downlink_compression


def test_make_run_defaults_pass_checks():
    # `make run` is `pocketfl simulate` with no options.
    config = load_run_config({})

    check_min_reports(config, config.resolved_num_clients)


class _LimitedTask:
    """The parts of a Task that resolve_num_clients reads: at most 10 phones."""

    name = "limited"

    def default_num_clients(self) -> int:
        return 4

    def max_clients(self) -> int:
        return 10


@pytest.mark.parametrize(
    ("option_names", "option"),
    [(None, "num-clients"), ({"num_clients": "--clients"}, "--clients")],
)
def test_task_client_limit_names_option(option_names, option):
    config = load_run_config({"num_clients": 11, "partitioning": "iid"})

    with pytest.raises(ValueError) as raised:
        resolve_num_clients(config, _LimitedTask(), option_names)

    message = str(raised.value)
    assert message.startswith(f"invalid value 11 for {option}: task 'limited' can split its data")
    assert message.endswith(f"set {option} to at most 10")
    assert resolve_num_clients(config.model_copy(update={"num_clients": 10}), _LimitedTask(), option_names) == 10


def test_clock_settings_without_clock_warned(caplog):
    with caplog.at_level("WARNING", logger="pocketfl.server.federation"):
        _warn_clock_settings(RunConfig(round_deadline=30.0, over_selection=1.3))
        _warn_clock_settings(RunConfig())

    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "round-deadline=30.0 and over-selection=1.3 act only on simulated phones" in warnings[0]
