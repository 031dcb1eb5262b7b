"""Aqueduct: CPU-bound Python work (ML inference) in parallel processes, as multi-step
pipelines, with a Rust engine underneath.

    from aqueduct import Flow, FlowStep, BaseTask, BaseTaskHandler
"""

from .flow import Flow, FlowState, FlowStep, RestartPolicy
from .handler import BaseTaskHandler
from .logger import log
from .streaming import emit
from .task import BaseTask

__all__ = ['BaseTask', 'BaseTaskHandler', 'Flow', 'FlowState', 'FlowStep', 'RestartPolicy', 'emit', 'log']
