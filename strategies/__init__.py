"""Server strategies that aggregate compressed client updates."""

from .compressed_fedavg import CompressedFedAvg, RoundTraffic

__all__ = ["CompressedFedAvg", "RoundTraffic"]
