"""The `lung_ct` dataset: Kaggle's lung CT slices and volumes with lung masks (see the builder module).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("lung_ct")` or import `data_builders.lung_ct.lung_ct_dataset_builder`.
"""
