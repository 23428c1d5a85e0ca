"""The real-time control loop of one robot: re-exported from picard_client.realtime, where it
lives so a robot computer runs the same loop without this package (docs/design.md §8)."""

from picard_client.realtime import (
    CLOCKS,
    HANDOFFS,
    HOLD_SOURCE,
    ChunkDims,
    ChunkFn,
    ChunkRequest,
    ControlStep,
    Prefix,
    RealtimeController,
    RealtimeSettings,
    jerk_metrics,
    max_lead_steps,
    soft_mask_weights,
    summarize_realtime,
    timed_requests,
)

__all__ = ["CLOCKS", "HANDOFFS", "HOLD_SOURCE", "ChunkDims", "ChunkFn", "ChunkRequest",
           "ControlStep", "Prefix", "RealtimeController", "RealtimeSettings", "jerk_metrics",
           "max_lead_steps", "soft_mask_weights", "summarize_realtime", "timed_requests"]
