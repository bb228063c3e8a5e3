"""The `drive` dataset: DRIVE retinal images with vessel and field-of-view masks (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("drive")` or import `data_builders.drive.drive_dataset_builder`.
"""
