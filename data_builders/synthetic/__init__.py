"""The `synthetic` dataset: stage C's accepted samples as a TFDS dataset (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS).
"""
