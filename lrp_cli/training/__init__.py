"""``lrp-heatmap train``: fit a classifier on folders of images, then explain it with its class names.

Split by concern: ``settings`` (the config's ``train:`` section; no heavy imports), ``folders`` (class
folders, splits, unreadable images), ``model`` (heads and frozen backbones), ``checkpoint`` (files that
``run --weights`` recognises), ``loop`` (epochs, mixed precision, DDP), ``curves`` (metrics and plot),
``shapes`` (a generated data set and a tiny CNN for tests and the README).
"""
