"""The pipeline's steps, one module each with one public `run(cfg) -> Result`:

    pretrain  RotNet from scratch (optional): starting weights without a download
    extract   features of every image from the starting model, chunk by chunk
    cluster   k-means of the features: centroids and one pseudo-label per image (no torch)
    train     a network from scratch on the pseudo-labels
    evaluate  kNN, low-shot kNN and linear probes of both networks, and the run report

Steps import neither each other nor the command line; they meet only through artifacts.
"""
