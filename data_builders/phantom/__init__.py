"""The `phantom` dataset: procedural, registered multimodal brain slices (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("phantom")` or import `data_builders.phantom.phantom_dataset_builder`.
"""
