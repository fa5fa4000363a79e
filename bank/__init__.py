"""The feature bank: the one on-disk contract between ``encode`` (writer) and ``distill`` (reader)."""
