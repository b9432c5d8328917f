"""KV transfer over NIXL: layerwise DE->PE channel, new-token / full-KV return, traffic classes."""

from dualpath.transfer.channel import ChannelLive, KVChannel
from dualpath.transfer.config import FabricQos, LimiterConfig, TrafficClass, TransferConfig
from dualpath.transfer.flows import Inbound, Outbound, TransferFailed
from dualpath.transfer.grid import LayerBlockGrid, grid_for_buffer, grid_for_layer_major, merged_pair_descs
from dualpath.transfer.limiter import LimiterStats, PriorityLimiter

__all__ = [
    "ChannelLive",
    "FabricQos",
    "Inbound",
    "KVChannel",
    "LayerBlockGrid",
    "LimiterConfig",
    "LimiterStats",
    "Outbound",
    "PriorityLimiter",
    "TrafficClass",
    "TransferConfig",
    "TransferFailed",
    "grid_for_buffer",
    "grid_for_layer_major",
    "merged_pair_descs",
]
