"""Data: what a batch is made of.

layouts        which images make up each split (split folders, one folder + split file, CSV manifest)
dataset        LeafDataset, InputSpec, transforms, the start-up scan, loaders (build_loader, open_split)
multispectral  .npy / .tif band stacks and band selection
augment        RandAugment with the MS bands riding along
mixing         Mixup / CutMix collate, and the cross-entropy of a mixed batch
unlabeled      unlabelled images for distillation and the labelled/unlabelled share per batch
demo           the synthetic demo set (make_demo_dataset)
"""
