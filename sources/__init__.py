"""Ground floor: where images come from. Dataset entries of ``pipeline.yaml``, image layouts and decoding, and the
built-in demo scene generator. Imports only :mod:`configlib` from the project."""
