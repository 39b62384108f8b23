"""Round instructions that the server sends to clients, validated on the client."""

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pocketfl.compression import parse_compression_spec


def _kebab_case(name: str) -> str:
    return name.replace("_", "-")


class RoundInstructions(BaseModel):
    """Training settings that travel in the ConfigRecord "config" of a train message."""

    model_config = ConfigDict(extra="ignore", alias_generator=_kebab_case, populate_by_name=True)

    server_round: int = Field(ge=1)
    compression: str
    error_feedback: bool
    local_epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0.0, le=10.0)
    batch_size: int = Field(ge=1, le=4096)
    held_out_people: int = Field(ge=1)
    seed: int = Field(ge=0)
    cache_dir: str = ""
    qat: bool = False
    # Megabytes; 0 means no limit, for the ConfigRecord has no null.
    memory_limit_mb: float = Field(0.0, ge=0.0)

    @field_validator("compression")
    @classmethod
    def _check_compression(cls, value: str) -> str:
        return str(parse_compression_spec(value))

    def to_config_record(self) -> ConfigRecord:
        """Return the ConfigRecord the server sends."""
        return ConfigRecord(self.model_dump(by_alias=True, exclude={"server_round"}))

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> "RoundInstructions":
        """Validate the server's ConfigRecord, or raise ValueError naming the bad keys."""
        try:
            return cls.model_validate(dict(record))
        except ValidationError as error:
            raise ValueError(f"invalid round instructions from the server: {error}") from None
