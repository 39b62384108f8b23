"""The simulated clock, round deadlines and device profile files."""

from collections import Counter

import numpy as np
import pytest

from pocketfl.simulations.clock import PhoneClock, transfer_seconds
from pocketfl.simulations.profiles import DeviceProfile, Population, load_population
from pocketfl.strategies.device_clock import ClientTime, close_round
from pocketfl.strategies.sampling import sample_in_order


def _profile(**changes) -> DeviceProfile:
    values = {
        "name": "phone",
        "weight": 1.0,
        "train_samples_per_second": 100.0,
        "memory_mb": 2048,
        "downlink_mbps": 8.0,
        "uplink_mbps": 2.0,
        "availability": 1.0,
    }
    values.update(changes)
    return DeviceProfile(**values)


def test_client_time_adds_download_training_and_upload():
    clock = PhoneClock(Population(profiles=[_profile()]), seed=0, local_epochs=2)

    time = clock.client_time(7, 1, downlink_bytes=1_000_000, uplink_bytes=250_000, num_examples=300)

    # 8 Mbit at 8 Mbps, 2 epochs x 300 samples at 100/s, 2 Mbit at 2 Mbps.
    assert time.download_seconds == pytest.approx(1.0)
    assert time.train_seconds == pytest.approx(6.0)
    assert time.upload_seconds == pytest.approx(1.0)
    assert time.total_seconds == pytest.approx(8.0)


def test_transfer_seconds_uses_decimal_megabits():
    assert transfer_seconds(125_000, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="invalid transfer of -1 bytes"):
        transfer_seconds(-1, 1.0)


def _times(*totals: float) -> dict[int, ClientTime]:
    return {node: ClientTime(0.0, total, 0.0) for node, total in enumerate(totals)}


def test_deadline_drops_exactly_the_clients_past_it():
    times = _times(5.0, 30.0, 10.0, 10.000001, 9.0)

    outcome = close_round(times, target_reports=5, deadline_seconds=10.0)

    assert outcome.accepted == [0, 4, 2]
    assert outcome.late == [3, 1]
    # Fewer reports than needed: the server waits until the deadline.
    assert outcome.seconds == 10.0


def test_round_closes_at_the_last_report_it_needs():
    times = _times(4.0, 1.0, 3.0, 2.0)

    outcome = close_round(times, target_reports=2, deadline_seconds=100.0)

    assert outcome.accepted == [1, 3]
    assert outcome.late == [2, 0]
    assert outcome.seconds == 2.0


def test_equal_arrivals_follow_send_order():
    # Nodes 0 to 2 arrive at the same second. Node ids change between
    # simulated runs, so the position in the sample breaks the tie.
    times = _times(2.0, 2.0, 2.0, 1.0)

    outcome = close_round(times, target_reports=2, deadline_seconds=None, send_order={2: 0, 0: 1, 1: 2, 3: 3})

    assert outcome.accepted == [3, 2]
    assert outcome.late == [0, 1]


def test_round_without_deadline_waits_for_the_last_report():
    outcome = close_round(_times(4.0, 1.0), target_reports=3, deadline_seconds=None)

    assert outcome.accepted == [1, 0]
    assert outcome.late == []
    assert outcome.seconds == 4.0


def test_round_with_dropouts_waits_until_the_deadline():
    outcome = close_round(_times(1.0), target_reports=2, deadline_seconds=60.0, waited_for_dropouts=True)

    assert outcome.accepted == [0]
    assert outcome.seconds == 60.0


def test_profiles_are_dealt_in_proportion_and_reproducibly():
    population = Population(
        profiles=[_profile(name="slow", weight=3.0), _profile(name="fast", weight=1.0)]
    )
    # Each run gives the same 400 phones new random node ids. The strategy
    # passes them to the clock in one stable order (by partition id).
    rng = np.random.default_rng(0)
    first_run_nodes = [int(node) for node in rng.choice(2**40, size=400, replace=False)]
    second_run_nodes = [int(node) for node in rng.choice(2**40, size=400, replace=False)]

    first = PhoneClock(population, seed=3, local_epochs=1)
    first.assign(first_run_nodes)
    second = PhoneClock(population, seed=3, local_epochs=1)
    second.assign(second_run_nodes)

    first_profiles = [first.profile(node).name for node in first_run_nodes]
    assert Counter(first_profiles) == {"slow": 300, "fast": 100}
    assert first_profiles == [second.profile(node).name for node in second_run_nodes]
    dropouts = [first.drops_out(node, 2, 0.0) for node in first_run_nodes]
    assert dropouts == [second.drops_out(node, 2, 0.0) for node in second_run_nodes]


def test_profiles_follow_the_order_given_not_node_ids():
    population = Population(
        profiles=[_profile(name="slow", weight=1.0), _profile(name="fast", weight=1.0)]
    )
    nodes = list(range(100))

    forward = PhoneClock(population, seed=3, local_epochs=1)
    forward.assign(nodes)
    backward = PhoneClock(population, seed=3, local_epochs=1)
    backward.assign(nodes[::-1])

    # Phone k in the order gets the same profile, whatever its node id.
    assert [forward.profile(node).name for node in nodes] == [
        backward.profile(node).name for node in nodes[::-1]
    ]


def test_dropouts_follow_availability_by_hour():
    night_only = [1.0 if hour < 6 else 0.0 for hour in range(24)]
    clock = PhoneClock(Population(profiles=[_profile(availability=night_only)]), seed=0, local_epochs=1)
    clock.assign(range(50))

    at_night = [clock.drops_out(node, 1, elapsed_seconds=3600.0) for node in range(50)]
    at_noon = [clock.drops_out(node, 1, elapsed_seconds=12 * 3600.0) for node in range(50)]

    assert not any(at_night)
    assert all(at_noon)


def test_dropout_rate_matches_availability():
    clock = PhoneClock(Population(profiles=[_profile(availability=0.8)]), seed=1, local_epochs=1)
    clock.assign(range(2000))

    dropped = sum(clock.drops_out(node, 4, 0.0) for node in range(2000))

    assert 300 < dropped < 500


def test_phones_without_enough_memory_never_take_part():
    population = Population(profiles=[_profile(memory_mb=512)])
    clock = PhoneClock(population, seed=0, local_epochs=1, required_memory_mb=1024)

    assert clock.drops_out(1, 1, 0.0)


PROFILE_FILE = """
[[profiles]]
name = "budget"
weight = 1
train_samples_per_second = 300
memory_mb = 1024
downlink_mbps = 10
uplink_mbps = {uplink}
availability = 0.9
"""


def test_profile_file_loads(tmp_path):
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="3.5"))

    population = load_population(path)

    assert population.profiles[0].uplink_mbps == 3.5


def test_profile_file_with_a_negative_value_names_the_field(tmp_path):
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="-2"))

    with pytest.raises(ValueError, match=r"profiles\[0\]\.uplink_mbps: .*greater than 0 \(got -2\)"):
        load_population(path)


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_profile_file_with_a_non_finite_value_names_the_field(tmp_path, value):
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink=value))

    with pytest.raises(ValueError, match=r"profiles\[0\]\.uplink_mbps: .*finite number"):
        load_population(path)


def test_profile_file_with_a_missing_value_names_the_field(tmp_path):
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="1").replace("memory_mb = 1024\n", ""))

    with pytest.raises(ValueError, match=r"profiles\[0\]\.memory_mb: missing"):
        load_population(path)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("weight = 1", "weight"),
        ("train_samples_per_second = 300", "train_samples_per_second"),
        ("memory_mb = 1024", "memory_mb"),
        ("downlink_mbps = 10", "downlink_mbps"),
        ("uplink_mbps = 1", "uplink_mbps"),
        ("availability = 0.9", "availability"),
    ],
)
@pytest.mark.parametrize("boolean", ["true", "false"])
def test_profile_boolean_number_rejected(tmp_path, line, field, boolean):
    # pydantic alone reads true as 1.0, which would pass as a weight of 1.
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="1").replace(line, f"{field} = {boolean}"))

    with pytest.raises(ValueError, match=rf"profiles\[0\]\.{field}: true and false are not numbers"):
        load_population(path)


def test_profile_boolean_hourly_availability_rejected(tmp_path):
    hourly = ", ".join(["true"] + ["0.5"] * 23)
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="1").replace("availability = 0.9", f"availability = [{hourly}]"))

    with pytest.raises(ValueError, match=r"profiles\[0\]\.availability: true and false are not numbers"):
        load_population(path)


def test_profile_file_with_a_bad_hourly_availability_names_the_field(tmp_path):
    path = tmp_path / "phones.toml"
    path.write_text(PROFILE_FILE.format(uplink="1").replace("availability = 0.9", "availability = [0.5, 0.5]"))

    with pytest.raises(ValueError, match=r"profiles\[0\]\.availability: needs one value per hour"):
        load_population(path)


def test_dropouts_independent_of_sampling():
    # Phone 0 is sampled in half the rounds and drops out in half. Streams
    # seeded alike made both happen together in 17% of rounds, not 25%.
    clock = PhoneClock(Population(profiles=[_profile(availability=0.5)]), seed=0, local_epochs=2)
    clock.assign([0, 1, 2, 3])
    rounds = range(1, 4001)

    both = sum(
        0 in sample_in_order([0, 1, 2, 3], 2, 0, server_round, 0) and clock.drops_out(0, server_round, 0.0)
        for server_round in rounds
    )

    assert abs(both / len(rounds) - 0.25) < 0.03


def test_profile_weights_summing_to_infinity_rejected():
    huge = [_profile(name=name, weight=1e308) for name in ("a", "b")]

    with pytest.raises(ValueError, match="profile weights sum to more than a float can hold"):
        Population(profiles=huge)
