"""Data: what a batch is made of. Modules, lowest first (each imports only those above it): layouts (which images
make up each split), multispectral (MS band stacks), augment (RandAugment), mixing (Mixup / CutMix), demo, transforms
(PairedTransform), dataset (LeafDataset, InputSpec), scan (the start-up scan), unlabeled, loaders (the DataLoaders).
"""
