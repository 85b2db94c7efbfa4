"""Stage 1, the data: Fashion-MNIST's files (found, downloaded, verified, parsed), the split,
augmentation of whole-epoch tensors, and the pipeline that turns any picture into the 28x28
image the models were trained on (NumPy and Pillow only: no PyTorch)."""
