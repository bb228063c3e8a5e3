"""The `tianchi_lung_ct` dataset: Tianchi 2019 chest-CT lesion detection, manual download (see the builder).

Importing this package does not import the builder (and so does not register it with TFDS); use
`data_builders.get_builder("tianchi_lung_ct")` or import
`data_builders.tianchi_lung_ct.tianchi_lung_ct_dataset_builder`.
"""
