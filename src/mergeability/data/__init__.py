"""Datasets in the PopQA schema, the bundled `geo` dataset, and multiple-choice conversion."""

from mergeability.data.facts import Fact, load_facts
from mergeability.data.mc import MCItem, build_items, normalize

__all__ = ["Fact", "load_facts", "MCItem", "build_items", "normalize"]
