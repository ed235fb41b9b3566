"""The planner: device profiles, model shapes, the memory model, the search, and measuring a plan for real."""

from lamda_edge.planner.memory import Estimate, TrainSetup, estimate
from lamda_edge.planner.profiles import DeviceProfile, ModelShape, get_device, get_model

__all__ = ["DeviceProfile", "Estimate", "ModelShape", "TrainSetup", "estimate", "get_device", "get_model"]
