"""Device profiles of simulated phones and the default population mix.

A profile sets how fast a phone trains the task's model, how much memory it
can give to training, how fast its link is in each direction and how often it
is available for federated work. A population is a weighted mix of profiles;
`load_population` reads one from a TOML file:

    [[profiles]]
    name = "mid-4g"
    weight = 0.5                      # share of the population, any positive scale
    train_samples_per_second = 1200.0 # for the task's model, one core
    memory_mb = 2048
    downlink_mbps = 36.0
    uplink_mbps = 11.2
    availability = 0.9                # or a list of 24 values, one per hour of day
"""

import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

HOURS_PER_DAY = 24


class DeviceProfile(BaseModel):
    """One kind of phone on one kind of link."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, description="Name shown in reports, such as 'low-end-4g'.")
    weight: float = Field(gt=0, description="Share of the population; weights need not sum to 1.")
    train_samples_per_second: float = Field(
        gt=0, description="Training throughput for the task's model, in samples per second."
    )
    memory_mb: float = Field(gt=0, description="Memory the OS lets a background job use, in MiB.")
    downlink_mbps: float = Field(gt=0, description="Download bandwidth, in megabits per second.")
    uplink_mbps: float = Field(gt=0, description="Upload bandwidth, in megabits per second.")
    availability: float | list[float] = Field(
        description=(
            "Probability that the phone is idle, charging and on an unmetered network "
            "when the server asks it to train: one value, or 24 values for hours 0 to 23."
        )
    )

    @field_validator(
        "weight",
        "train_samples_per_second",
        "memory_mb",
        "downlink_mbps",
        "uplink_mbps",
        "availability",
        mode="before",
    )
    @classmethod
    def _reject_booleans(cls, value: Any) -> Any:
        # pydantic would read true as 1.0. TOML integers such as `memory_mb = 2048` stay valid.
        values = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in values):
            raise ValueError("true and false are not numbers; give a number")
        return value

    @field_validator("availability")
    @classmethod
    def _check_availability(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) != HOURS_PER_DAY:
            raise ValueError(f"needs one value per hour, {HOURS_PER_DAY} in all, got {len(value)}")
        for probability in values:
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{probability} is not a probability; use values from 0 to 1")
        return value

    def availability_at(self, hour: int) -> float:
        """Probability of being available at `hour` (0 to 23) of the simulated day."""
        if isinstance(self.availability, list):
            return self.availability[hour % HOURS_PER_DAY]
        return self.availability


class Population(BaseModel):
    """A weighted mix of device profiles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: list[DeviceProfile] = Field(min_length=1)

    @field_validator("profiles")
    @classmethod
    def _check_unique_names(cls, profiles: list[DeviceProfile]) -> list[DeviceProfile]:
        names = [profile.name for profile in profiles]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"profile names must be unique; repeated: {', '.join(duplicates)}")

        # Each weight is finite, but the shares are weight / sum.
        if not math.isfinite(sum(profile.weight for profile in profiles)):
            raise ValueError("profile weights sum to more than a float can hold; use shares such as 0.25")
        return profiles


# Training throughput of the HAR model (32,230 parameters, batch 32, SGD) on
# one core of a 2-core AMD EPYC virtual machine: at most 1,965 samples per
# second in 5 runs of benchmarks/device_speed.py (the machine was shared, so
# the median was 1,301). Phone cores are slower. The factors below are our
# own estimates, not measurements: a flagship big core about that fast, a
# mid-range core about half, a low-end little core about a fifth.
_HIGH_END_SAMPLES_PER_SECOND = 2000.0
_MID_RANGE_SAMPLES_PER_SECOND = 1000.0
_LOW_END_SAMPLES_PER_SECOND = 400.0

# Availability: the share of sampled phones that stay idle, charging and on
# an unmetered network until they report. Bonawitz et al., "Towards Federated
# Learning at Scale: System Design" (MLSys 2019, arXiv:1902.01046) describe
# these eligibility rules and phones that drop out of rounds. The values
# below are our own estimates. A profile file can give 24 values to follow
# the hour of day.
DEFAULT_POPULATION = Population(
    profiles=[
        # Bandwidth: Ookla Speedtest Global Index, August 2020, India mobile:
        # 12.10 Mbps down, 4.21 Mbps up, a market where low-end phones dominate.
        DeviceProfile(
            name="low-end-cellular",
            weight=0.25,
            train_samples_per_second=_LOW_END_SAMPLES_PER_SECOND,
            memory_mb=1024,  # our estimate: 2-3 GB phone, about 1 GB for a background job
            downlink_mbps=12.10,
            uplink_mbps=4.21,
            availability=0.9,  # our estimate
        ),
        # Bandwidth: Ookla Speedtest Global Index, September 2020, world mobile
        # average: 35.96 Mbps down, 11.22 Mbps up.
        DeviceProfile(
            name="mid-range-cellular",
            weight=0.30,
            train_samples_per_second=_MID_RANGE_SAMPLES_PER_SECOND,
            memory_mb=2048,  # our estimate
            downlink_mbps=35.96,
            uplink_mbps=11.22,
            availability=0.9,  # our estimate
        ),
        # Bandwidth: Ookla, "Growing and Slowing: The State of 5G Worldwide in
        # 2021", world 5G medians in Q3 2021: 166.13 Mbps down, 21.08 Mbps up.
        DeviceProfile(
            name="high-end-5g",
            weight=0.15,
            train_samples_per_second=_HIGH_END_SAMPLES_PER_SECOND,
            memory_mb=4096,  # our estimate
            downlink_mbps=166.13,
            uplink_mbps=21.08,
            availability=0.9,  # our estimate
        ),
        # Bandwidth: Ookla Speedtest Global Index, September 2020, world fixed
        # broadband average: 85.73 Mbps down, 45.74 Mbps up; a phone on home
        # Wi-Fi gets at most its line's speed.
        DeviceProfile(
            name="mid-range-wifi",
            weight=0.20,
            train_samples_per_second=_MID_RANGE_SAMPLES_PER_SECOND,
            memory_mb=2048,  # our estimate
            downlink_mbps=85.73,
            uplink_mbps=45.74,
            availability=0.95,  # our estimate
        ),
        DeviceProfile(
            name="high-end-wifi",
            weight=0.10,
            train_samples_per_second=_HIGH_END_SAMPLES_PER_SECOND,
            memory_mb=4096,  # our estimate
            downlink_mbps=85.73,
            uplink_mbps=45.74,
            availability=0.95,  # our estimate
        ),
    ]
)

# The default mix with every phone on its cellular link: the case where uplink
# compression matters most.
CELLULAR_POPULATION = Population(
    profiles=[profile for profile in DEFAULT_POPULATION.profiles if "wifi" not in profile.name]
)

NAMED_POPULATIONS = {"default": DEFAULT_POPULATION, "cellular": CELLULAR_POPULATION}


def load_population(path: Path) -> Population:
    """Read a population from a TOML file, or raise ValueError naming each bad field.

    A missing, negative or non-numeric value fails with its place in the file,
    such as `profiles[2].uplink_mbps`.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read the profile file '{path}': {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"the profile file '{path}' is not valid TOML: {error}") from None

    try:
        return Population.model_validate(data)
    except ValidationError as error:
        lines = [f"invalid profile file '{path}':"]
        for item in error.errors():
            place = _place(item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "missing":
                lines.append(f"  {place}: missing; every profile needs it")
            else:
                lines.append(f"  {place}: {message} (got {item.get('input')!r})")
        raise ValueError("\n".join(lines)) from None


def resolve_population(value: str) -> Population:
    """Return a named population ('default', 'cellular') or the one in a TOML file."""
    if value in NAMED_POPULATIONS:
        return NAMED_POPULATIONS[value]
    return load_population(Path(value))


def _place(location: tuple) -> str:
    # ('profiles', 2, 'uplink_mbps') -> 'profiles[2].uplink_mbps'
    place = ""
    for part in location:
        if isinstance(part, int):
            place += f"[{part}]"
        else:
            place += f".{part}" if place else str(part)
    return place or "file"
