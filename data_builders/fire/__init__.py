"""The `fire` dataset: FIRE fundus images, singly or as registration pairs (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("fire")` or import `data_builders.fire.fire_dataset_builder`.
"""
