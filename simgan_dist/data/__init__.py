"""Datasets: storage URIs, the Parquet contract, splits, the simulator, ingest and Ray Data pipelines.

Importing this package imports nothing else; only `simgan_dist.data.pipeline` imports Ray.
"""
