"""Engine statistics as the front end sees them (the structs travel in messages.py)."""
from rvllm.engine.messages import EngineStats, FinishedRecord

__all__ = ["EngineStats", "FinishedRecord"]
