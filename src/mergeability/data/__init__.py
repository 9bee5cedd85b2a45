"""Datasets in the PopQA schema, the bundled `geo` dataset, and multiple-choice conversion."""

from mergeability.data.facts import Fact
from mergeability.data.mc import MCItem, alias_key, build_items
from mergeability.data.sources import load_facts

__all__ = ["Fact", "load_facts", "MCItem", "build_items", "alias_key"]
