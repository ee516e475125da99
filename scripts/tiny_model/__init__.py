"""The pieces of scripts/train_tiny.py, one job each: the synthetic chat corpus,
the tokenizer, the training loop, and the greedy samples and model card."""
