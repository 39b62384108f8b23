"""Round instructions that the server sends to clients, validated on the client."""

from pathlib import Path

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pocketfl.compression import parse_compression_spec
from pocketfl.tasks.base import TaskSettings, TrainSettings


def _kebab_case(name: str) -> str:
    return name.replace("_", "-")


class RoundInstructions(BaseModel):
    """Training settings that travel in the ConfigRecord "config" of a train message."""

    model_config = ConfigDict(extra="ignore", alias_generator=_kebab_case, populate_by_name=True)

    server_round: int = Field(ge=1)
    # The `name` of the task the server runs; the phone checks that it runs the same.
    task: str = "har"
    compression: str
    error_feedback: bool
    local_epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0.0, le=10.0)
    batch_size: int = Field(ge=1, le=4096)
    held_out_people: int = Field(ge=1)
    seed: int = Field(ge=0)
    cache_dir: str = ""
    partitioning: str = "people"
    qat: bool = False
    # Megabytes; 0 means no limit, for the ConfigRecord has no null.
    memory_limit_mb: float = Field(0.0, ge=0.0)
    # The round of this phone's last report that the server discarded as
    # late, 0 for none. Set per message, only in error-feedback runs.
    discarded_round: int = Field(0, ge=0)

    @field_validator("compression")
    @classmethod
    def _check_compression(cls, value: str) -> str:
        return str(parse_compression_spec(value))

    def task_settings(self) -> TaskSettings:
        """Return the settings that build this run's task on the phone."""
        return TaskSettings(
            seed=self.seed,
            cache_dir=Path(self.cache_dir) if self.cache_dir else None,
            held_out_people=self.held_out_people,
            partitioning=self.partitioning,
        )

    def train_settings(self, seed: int) -> TrainSettings:
        """Return this round's local training settings, with the phone's own seed."""
        return TrainSettings(
            epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            seed=seed,
        )

    def to_config_record(self) -> ConfigRecord:
        """Return the round config the server sends to every phone; per-message keys are left out."""
        return ConfigRecord(self.model_dump(by_alias=True, exclude={"server_round", "discarded_round"}))

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> "RoundInstructions":
        """Validate the server's ConfigRecord, or raise ValueError naming the bad keys."""
        try:
            return cls.model_validate(dict(record))
        except ValidationError as error:
            raise ValueError(f"invalid round instructions from the server: {error}") from None
