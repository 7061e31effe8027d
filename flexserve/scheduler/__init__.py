"""Torch-free scheduling core: requests, the paged KV block manager, the FCFS / MLFQ / skip-join MLFQ
policies, and a discrete-event simulator that drives the same code. See docs/SCHEDULER.md.

Nothing here imports torch: the engine executes these decisions, the simulator replays them on a cost model.
"""
from .block_manager import BlockManager, BlockUsage, NoFreeBlocksError
from .config import SchedulerConfig
from .cost import LinearCostModel, prefill_time_from, swap_time_per_block
from .errors import QueueFullError, RequestTooLargeError
from .output import ScheduledSeq, SchedulerOutput, SchedulerStats
from .policies import (ALL_SCHEDULERS, SCHEDULERS, FCFSScheduler, MLFQScheduler, ShortestRemainingScheduler,
                       SkipJoinMLFQScheduler, make_scheduler)
from .request import PENDING_TOKEN, Request, SequenceStatus
from .base import Scheduler

__all__ = [
    "BlockManager", "BlockUsage", "NoFreeBlocksError", "SchedulerConfig", "LinearCostModel",
    "prefill_time_from", "swap_time_per_block", "QueueFullError", "RequestTooLargeError", "ScheduledSeq",
    "SchedulerOutput", "SchedulerStats", "SCHEDULERS", "ALL_SCHEDULERS", "FCFSScheduler", "MLFQScheduler",
    "ShortestRemainingScheduler", "SkipJoinMLFQScheduler", "make_scheduler", "PENDING_TOKEN", "Request",
    "SequenceStatus", "Scheduler",
]
