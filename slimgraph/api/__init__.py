"""The public verbs: quantize, prune, factorize, optimize, finetune, sensitivity, sweep."""
