"""Backstream: a self-hosted LLM chat gateway with durable background chat streams."""

__version__ = "0.1.0"
