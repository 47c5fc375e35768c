"""llava-pipeline: enrich image datasets with LLaVA-family models on Ray Data."""

__version__ = "0.1.0"
