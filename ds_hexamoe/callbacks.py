"""The documented import path of the Trainer callback; it lives in :mod:`ds_hexamoe.integrations.trainer`."""
from .integrations.trainer import STATS_FILE, HexaMoECallback

__all__ = ["HexaMoECallback", "STATS_FILE"]
