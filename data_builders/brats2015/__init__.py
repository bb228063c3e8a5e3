"""The `brats2015` dataset: BRATS 2015 multimodal brain MR from the manual download (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("brats2015")` or import `data_builders.brats2015.brats2015_dataset_builder`.
"""
