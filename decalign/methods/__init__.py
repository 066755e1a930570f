"""Decoding methods: one module each, a config dataclass plus a step machine, found by name.

`base` holds what they share (the registry, the Job a method serves, the `Method` step-machine
shape and the `drive` loop that runs several methods in one batch); each other module is one
method family and reads like its paper's loop. Importing this package registers them all.
"""

from . import args, blockwise, bon, cards, cold, contrastive, dexperts, greedy, rs, sample, smc, spec_rejection, treebon
from .base import (
    METHODS, Driver, Job, Method, MethodSpec, SamplingParams, Search, SearchParams, drive, get_method, make_config, method_names, missing_adapter,
    param, parse_method_spec, register,
)

__all__ = [
    "METHODS", "Driver", "Job", "Method", "MethodSpec", "SamplingParams", "Search", "SearchParams", "args", "blockwise", "bon", "cards", "cold", "contrastive",
    "dexperts", "drive", "get_method", "greedy", "make_config", "method_names", "missing_adapter", "param",
    "parse_method_spec", "register", "rs", "sample", "smc", "spec_rejection", "treebon",
]
