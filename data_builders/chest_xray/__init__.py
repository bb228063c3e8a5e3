"""The `chest_xray` dataset: Kaggle's chest X-ray pneumonia images (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("chest_xray")` or import `data_builders.chest_xray.chest_xray_dataset_builder`.
"""
