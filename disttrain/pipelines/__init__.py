"""Pipelines: the user's model, data and loss. Subclass `Pipeline` and name it in the config."""

from disttrain.pipelines.base import Batch, Pipeline, load_pipeline, pipeline_class

__all__ = ["Batch", "Pipeline", "load_pipeline", "pipeline_class"]
