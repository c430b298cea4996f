"""The QuickNAT network (Roy et al., NeuroImage 2019), written from the paper and its code."""

from .quicknat import QuickNAT, QuickNATConfig, count_parameters, set_mc_dropout, widen_filters, widen_input

__all__ = ["QuickNAT", "QuickNATConfig", "count_parameters", "set_mc_dropout", "widen_filters", "widen_input"]
