"""disttrain: YAML-configured distributed training that survives preemption and resumes exactly."""

__version__ = "0.1.0"
