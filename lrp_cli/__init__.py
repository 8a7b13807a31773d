"""lrp-heatmap: batch Layer-wise Relevance Propagation heatmaps from the command line."""

__version__ = "0.1.0"
