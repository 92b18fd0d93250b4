"""Data: what a batch is made of. Modules, lowest first (each imports only those above it):

layouts        which images make up each split: one reader per layout, in one table (LAYOUTS)
multispectral  .npy / .tif band stacks and band selection
augment        RandAugment with the MS bands riding along
mixing         Mixup / CutMix collate, and the cross-entropy of a mixed batch
demo           the synthetic demo set (make_demo_dataset)
transforms     PairedTransform: the same crop, resize and flips for RGB and MS, then normalization
dataset        LeafDataset, InputSpec, reading an image, MS band statistics
scan           the start-up scan: each file read in full, copies of val/test images refused
unlabeled      unlabelled images for distillation and the labelled/unlabelled share per batch
loaders        prepare_data, open_split, build_loader, resolve_input, EpochSampler
"""
